"""Aggregation topologies for packed sign buckets: where the vote runs, what crosses the wire.

A topology moves bytes and records them; the vote itself is the ``combine`` callable it is
given (``combine(packets [n, bytes], start) -> (planes [B, bytes], table)``, where ``start``
is the bucket byte the packets begin at), so no topology knows the optimizer's math.

- ``allgather``: every rank gathers every rank's bits and votes the whole bucket locally.
  (N-1) S sent and received per rank for a bucket of S bytes.
- ``sharded``: phase 1, all_to_all so rank j holds every rank's bits of shard j; phase 2,
  rank j votes shard j; phase 3, all_gather of the voted shards (B planes each). Per rank
  (N-1)/N S up and (N-1)/N S down for a 1-bit result, whatever N.
- ``server``: the paper's parameter server, here co-located on rank 0: gather, vote,
  broadcast. S up and B S down per worker; the server receives and sends N-1 times that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dlion.compress.buckets import Bucket
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic
from dlion.transport import Comm
from dlion.wire import WORD_BYTES

Combine = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BucketWire:
    """What a topology needs to know of a bucket: its name and where its payload bits lie."""

    name: str
    nbytes: int
    payload_ranges: tuple[tuple[int, int], ...]  # [first bit, end bit) of each tensor

    def payload_bits_in(self, lo_byte: int, hi_byte: int) -> int:
        lo, hi = 8 * lo_byte, 8 * hi_byte
        return sum(max(0, min(hi, b) - max(lo, a)) for a, b in self.payload_ranges)

    @staticmethod
    def of(name: str, bucket: Bucket) -> BucketWire:
        ranges = tuple((8 * s.byte_offset, 8 * s.byte_offset + s.numel) for s in bucket.slots)
        return BucketWire(name, bucket.nbytes, ranges)

    def traffic(self, lo_byte: int, hi_byte: int, planes: int = 1) -> Traffic:
        payload = self.payload_bits_in(lo_byte, hi_byte)
        return Traffic(payload=planes * payload, padding=planes * (8 * (hi_byte - lo_byte) - payload))


def align_bytes(topology: str, world_size: int) -> int:
    """Bucket sizes are multiples of this: whole 16-byte words per rank's shard."""
    return WORD_BYTES * world_size if topology in ("sharded", "hierarchical") else WORD_BYTES


def allgather_vote(
    comm: Comm, send: torch.Tensor, wire: BucketWire, combine: Combine, ledger: Ledger
) -> tuple[torch.Tensor, torch.Tensor]:
    gathered = comm.all_gather(send, f"{wire.name} all_gather").to(send.device)
    sent, received = all_gather_traffic(wire.traffic(0, wire.nbytes), comm.world_size)
    ledger.record(CollectiveRecord(wire.name, "all_gather", comm.world_size, sent, received))
    return combine(gathered, 0)


def sharded_vote(
    comm: Comm, send: torch.Tensor, wire: BucketWire, combine: Combine, ledger: Ledger
) -> tuple[torch.Tensor, torch.Tensor]:
    n, me = comm.world_size, comm.rank
    s = wire.nbytes // n
    others = [j for j in range(n) if j != me]
    # Phase 1: shard j of every rank's bits goes to rank j.
    mine = comm.all_to_all(send, f"{wire.name} all_to_all").to(send.device)
    up = _sum(wire.traffic(j * s, (j + 1) * s) for j in others)
    down = wire.traffic(me * s, (me + 1) * s) * (n - 1)
    ledger.record(CollectiveRecord(f"{wire.name}.shards", "all_to_all", n, up, down))
    # Phase 2: vote this rank's shard.
    planes, table = combine(mine, me * s)
    b = planes.shape[0]
    # Phase 3: all_gather the voted shards. In a ring each rank forwards every chunk but
    # that of the rank after it, and receives every chunk but its own.
    gathered = comm.all_gather(planes.contiguous().view(-1), f"{wire.name} result all_gather")
    gathered = gathered.to(send.device).view(n, b, s).permute(1, 0, 2).reshape(b, n * s)
    up = _sum(wire.traffic(j * s, (j + 1) * s, b) for j in range(n) if j != (me + 1) % n)
    down = _sum(wire.traffic(j * s, (j + 1) * s, b) for j in others)
    ledger.record(CollectiveRecord(f"{wire.name}.result", "all_gather", n, up, down))
    return gathered, table


def server_vote(
    comm: Comm,
    send: torch.Tensor,
    wire: BucketWire,
    combine: Combine,
    ledger: Ledger,
    *,
    result_planes: int,
    table: torch.Tensor,
    root: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameter server co-located on rank ``root``: gather the bits, vote, broadcast.

    Workers send S up and receive B*S down. The server receives (N-1) S (its own bits do
    not cross the wire) and sends (N-1) B S in a flat broadcast; its records are named
    ``[server]`` so its traffic reads apart from the workers'.
    """
    n, me = comm.world_size, comm.rank
    full = wire.traffic(0, wire.nbytes)
    gathered = comm.gather(send, root, f"{wire.name} gather to server")
    if me == root:
        assert gathered is not None
        planes, table = combine(gathered.to(send.device), 0)
        ledger.record(CollectiveRecord(f"{wire.name}[server]", "gather", n, Traffic(), full * (n - 1)))
    else:
        planes = torch.empty((result_planes, wire.nbytes), dtype=torch.uint8, device=send.device)
        ledger.record(CollectiveRecord(wire.name, "gather", n, full, Traffic()))
    if planes.shape[0] != result_planes:
        raise RuntimeError(
            f"{wire.name}: server produced {planes.shape[0]} planes, workers expect {result_planes}"
        )
    planes = comm.broadcast(planes, root, f"{wire.name} broadcast from server").to(send.device)
    down = wire.traffic(0, wire.nbytes, result_planes)
    if me == root:
        ledger.record(CollectiveRecord(f"{wire.name}[server]", "broadcast", n, down * (n - 1), Traffic()))
    else:
        ledger.record(CollectiveRecord(wire.name, "broadcast", n, Traffic(), down))
    return planes, table


def _sum(parts: object) -> Traffic:
    total = Traffic()
    for t in parts:  # type: ignore[attr-defined]
        total = total + t
    return total


TOPOLOGIES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "allgather": allgather_vote,
    "sharded": sharded_vote,
}


def vote_bits(
    backend: str,
    comm: Comm,
    send: torch.Tensor,
    wire: BucketWire,
    combine: Combine,
    ledger: Ledger,
    result: tuple[int, np.ndarray],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange a bucket's sign bits and vote them, by ``backend``. ``result`` = (planes,
    table) of the combined result, which every rank knows before any byte arrives."""
    if backend != "server":
        return TOPOLOGIES[backend](comm, send, wire, combine, ledger)
    planes, table = result
    table_t = torch.from_numpy(table).to(send.device)
    return server_vote(comm, send, wire, combine, ledger, result_planes=planes, table=table_t)
