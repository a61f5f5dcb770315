"""Where DGC's sparse messages meet: gathered by every rank (the dense tensors all-reduced in
rank order beside them), or at a server on rank 0 that sends the dense average back."""

from __future__ import annotations

import torch

from dlion.aggregate.ordered import ordered_all_reduce_mean, ring_all_gather
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
    if backend == "server":
        return _server(comm, msg, layout, ledger)
    n = comm.world_size
    gathered = comm.all_gather(msg, "dgc all_gather").cpu()
    chunks = [codec.message_traffic(layout, c) for c in codec.valid_slots(layout, gathered)]
    sent, received = ring_all_gather(chunks, comm.rank)
    ledger.record(CollectiveRecord("dgc", "all_gather", n, sent, received))
    avg = codec.decode_sum(layout, gathered).div_(n)
    if dense.numel():
        dense = ordered_all_reduce_mean(comm, dense, ledger)
    return codec.place_dense(layout, avg, dense)


def _server(comm: Comm, msg: torch.Tensor, layout: codec.WireLayout, ledger: Ledger) -> torch.Tensor:
    """Parameter server co-located on rank 0: its own message does not cross the wire."""
    n, me = comm.world_size, comm.rank
    total = layout.total_numel
    padded = round_up(total, 4)  # whole 16-byte words of fp32
    gathered = comm.gather(msg, SERVER_RANK, "dgc gather to server")
    avg = torch.zeros(padded, dtype=torch.float32)
    if me == SERVER_RANK:
        assert gathered is not None
        gathered = gathered.cpu()
        avg[:total] = codec.decode_sum(layout, gathered).div_(n)
        up = [codec.message_traffic(layout, c) for c in codec.valid_slots(layout, gathered)[1:]]
        ledger.record(CollectiveRecord("dgc[server]", "gather", n, Traffic(), sum(up, Traffic())))
    else:
        mine = codec.message_traffic(layout, codec.valid_slots(layout, msg[None])[0])
        ledger.record(CollectiveRecord("dgc", "gather", n, mine, Traffic()))
    avg = comm.broadcast(avg, SERVER_RANK, "dgc broadcast from server").cpu()
    down = Traffic(payload=32 * total, padding=32 * (padded - total))
    if me == SERVER_RANK:
        ledger.record(CollectiveRecord("dgc[server]", "broadcast", n, down * (n - 1), Traffic()))
    else:
        ledger.record(CollectiveRecord("dgc", "broadcast", n, Traffic(), down))
    return avg[:total]
