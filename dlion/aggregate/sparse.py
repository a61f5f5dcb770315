"""Where DGC's sparse messages meet: gathered by every rank (the dense tensors all-reduced in
rank order beside them), or at a server on rank 0 that sends the dense average back."""

from __future__ import annotations

import torch

from dlion.aggregate.backends import SPARSE, backend_spec
from dlion.aggregate.ordered import ordered_all_reduce_mean, ring_all_gather
from dlion.aggregate.rank0 import RootRound, exchange_at_root
from dlion.compress import dgc as codec
from dlion.ledger import CollectiveRecord, Ledger, Traffic
from dlion.transport import Comm
from dlion.wire import round_up

SERVER_RANK = 0


def exchange_sparse(
    comm: Comm, msg: torch.Tensor, dense: torch.Tensor, layout: codec.WireLayout, backend: str, ledger: Ledger
) -> torch.Tensor:
    """The average update of every live tensor, fp32[total numel]. ``dense``: the dense
    tensors' gradients when they travel apart from the message (empty otherwise)."""
    if backend_spec(backend, SPARSE).server:
        return _server(comm, msg, layout, ledger)
    n = comm.world_size
    gathered = comm.all_gather(msg, "dgc all_gather").cpu()
    chunks = _traffic(layout, gathered)
    sent, received = ring_all_gather(chunks, comm.rank)
    ledger.record(CollectiveRecord("dgc", "all_gather", n, sent, received))
    avg = codec.decode_sum(layout, gathered).div_(n)
    if dense.numel():
        dense = ordered_all_reduce_mean(comm, dense, ledger)
    return codec.place_dense(layout, avg, dense)


def _traffic(layout: codec.WireLayout, messages: torch.Tensor) -> list[Traffic]:
    """uint8[N, nbytes] -> each message's bits on the wire (its entries, not its empty slots)."""
    return [codec.message_traffic(layout, c) for c in codec.valid_slots(layout, messages)]


def _server(comm: Comm, msg: torch.Tensor, layout: codec.WireLayout, ledger: Ledger) -> torch.Tensor:
    """The server sends the dense average back: fp32, whole 16-byte words."""
    n, total = comm.world_size, layout.total_numel
    padded = round_up(total, 4)

    def average(gathered: torch.Tensor) -> tuple[torch.Tensor, None]:
        avg = torch.zeros(padded, dtype=torch.float32)
        avg[:total] = codec.decode_sum(layout, gathered).div_(n)
        return avg, None

    plan = RootRound(
        up_name="dgc",
        down_name="dgc",
        gather_what="dgc gather to server",
        broadcast_what="dgc broadcast from server",
        up=lambda messages: _traffic(layout, messages),
        down=Traffic(payload=32 * total, padding=32 * (padded - total)),
        reply_shape=(padded,),
        reply_dtype=torch.float32,
        root=SERVER_RANK,
    )
    avg, _ = exchange_at_root(comm, msg, plan, average, ledger)
    return avg[:total]
