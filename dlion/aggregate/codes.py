"""Where TernGrad's ternary codes are summed: on every rank (allgather), or at a server on
rank 0 that sends the exact sums back. Also the all_gather of the per-tensor scalers."""

from __future__ import annotations

import numpy as np
import torch

from dlion.aggregate.backends import CODES, backend_spec
from dlion.aggregate.rank0 import RootRound, exchange_at_root
from dlion.compress import terngrad as codec
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic
from dlion.transport import Comm
from dlion.wire import round_up

SERVER_RANK = 0


def share_scalers(comm: Comm, local: np.ndarray, ledger: Ledger) -> np.ndarray:
    """float32[T] of this rank's scalers -> float32[T], the max over ranks."""
    t = local.size
    send = np.zeros(max(4, round_up(t, 4)), np.float32)  # whole 16-byte words
    send[:t] = local
    gathered = comm.all_gather(torch.from_numpy(send), "scaler all_gather").cpu().numpy()
    sent, received = all_gather_traffic(
        Traffic(scalers=32 * t, padding=32 * (send.size - t)), comm.world_size
    )
    ledger.record(CollectiveRecord("scalers", "all_gather", comm.world_size, sent, received))
    return codec.shared_scalers(gathered[:, :t])


def exchange_codes(
    comm: Comm, packet: np.ndarray, layout: codec.CodeLayout, backend: str, ledger: Ledger
) -> np.ndarray:
    """int32[layout.n_slots]: the sum over ranks of every slot's ternary value."""
    server = backend_spec(backend, CODES).server
    n = comm.world_size
    up = layout.code_traffic()
    if not server:
        gathered = comm.all_gather(torch.from_numpy(packet), "ternary codes all_gather").cpu().numpy()
        ledger.record(CollectiveRecord("codes", "all_gather", n, *all_gather_traffic(up, n)))
        return codec.sum_codes(gathered)
    # The server sends the exact sums back, bit-sliced; it keeps its own unpacked.
    plane_bytes = layout.sums_bytes()

    def sum_at_server(gathered: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        sums = codec.sum_codes(gathered.cpu().numpy())
        return torch.from_numpy(codec.pack_sums(sums, n, plane_bytes)), sums

    plan = RootRound(
        up_name="codes",
        down_name="sums",
        gather_what="ternary codes gather to server",
        broadcast_what="ternary sums broadcast from server",
        up=up,
        down=layout.sums_traffic(n),
        reply_shape=(codec.level_bits(n), plane_bytes),
        reply_dtype=torch.uint8,
        root=SERVER_RANK,
    )
    planes, sums = exchange_at_root(comm, torch.from_numpy(packet), plan, sum_at_server, ledger)
    if sums is not None:
        return sums
    return codec.unpack_sums(planes.cpu().numpy(), n, layout.n_slots)
