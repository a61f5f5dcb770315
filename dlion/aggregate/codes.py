"""Where TernGrad's ternary codes are summed: on every rank (allgather), or at a server on
rank 0 that sends the exact sums back. Also the all_gather of the per-tensor scalers."""

from __future__ import annotations

import numpy as np
import torch

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
    n = comm.world_size
    up = layout.code_traffic()
    if backend == "allgather":
        gathered = comm.all_gather(torch.from_numpy(packet), "ternary codes all_gather").cpu().numpy()
        ledger.record(CollectiveRecord("codes", "all_gather", n, *all_gather_traffic(up, n)))
        return codec.sum_codes(gathered)
    # Server on rank 0: gather the packets, sum, broadcast the exact sums.
    gathered_t = comm.gather(torch.from_numpy(packet), SERVER_RANK, "ternary codes gather to server")
    plane_bytes = layout.sums_bytes()
    down = layout.sums_traffic(n)
    if comm.rank == SERVER_RANK:
        assert gathered_t is not None
        sums = codec.sum_codes(gathered_t.cpu().numpy())
        planes = codec.pack_sums(sums, n, plane_bytes)
        ledger.record(CollectiveRecord("codes[server]", "gather", n, Traffic(), up * (n - 1)))
    else:
        planes = np.zeros((codec.level_bits(n), plane_bytes), np.uint8)
        ledger.record(CollectiveRecord("codes", "gather", n, up, Traffic()))
    planes_t = comm.broadcast(torch.from_numpy(planes), SERVER_RANK, "ternary sums broadcast from server")
    if comm.rank == SERVER_RANK:
        ledger.record(CollectiveRecord("sums[server]", "broadcast", n, down * (n - 1), Traffic()))
        return sums
    ledger.record(CollectiveRecord("sums", "broadcast", n, Traffic(), down))
    return codec.unpack_sums(planes_t.cpu().numpy(), n, layout.n_slots)
