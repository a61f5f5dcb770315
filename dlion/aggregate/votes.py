"""Where a bucket's sign bits meet and are voted: one ``Topology`` object per backend.

A topology moves bytes and records them; the vote itself is the ``combine`` callable it is
given (``combine(packets [n, bytes], start) -> (planes [B, bytes], table)``, where ``start``
is the bucket byte the packets begin at), so no topology knows the optimizer's math. The
objects hold no state: the registry (dlion.aggregate.backends) keeps one per backend.

- ``ALLGATHER``: every rank gathers every rank's bits and votes the whole bucket locally.
  (N-1) S sent and received per rank for a bucket of S bytes.
- ``SHARDED``: phase 1, all_to_all so rank j holds every rank's bits of shard j; phase 2,
  rank j votes shard j; phase 3, all_gather of the voted shards (B planes each). Per rank
  (N-1)/N S up and (N-1)/N S down for a 1-bit result, whatever N.
- ``Server``: the paper's parameter server, here co-located on rank 0 (dlion.aggregate.rank0):
  gather, vote, broadcast. S up and B S down per worker; the server receives and sends N-1
  times that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from dlion.aggregate.rank0 import RootRound, exchange_at_root
from dlion.compress.buckets import Bucket
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic
from dlion.transport import Comm

Combine = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
Voted = tuple[torch.Tensor, torch.Tensor]  # (planes uint8 [B, S], table float32 [2^B])


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


class Topology(Protocol):
    """How one group's ranks exchange a bucket's sign bits and where the vote runs."""

    def vote(
        self,
        comm: Comm,
        send: torch.Tensor,
        wire: BucketWire,
        combine: Combine,
        ledger: Ledger,
        result: tuple[int, np.ndarray],
    ) -> Voted:
        """``send`` (uint8 [S], this rank's bits) -> (planes, table), the same on every rank.
        ``result`` = (B, table), which every rank knows before any byte arrives."""
        ...


def allgather_vote(
    comm: Comm, send: torch.Tensor, wire: BucketWire, combine: Combine, ledger: Ledger
) -> Voted:
    gathered = comm.all_gather(send, f"{wire.name} all_gather").to(send.device)
    sent, received = all_gather_traffic(wire.traffic(0, wire.nbytes), comm.world_size)
    ledger.record(CollectiveRecord(wire.name, "all_gather", comm.world_size, sent, received))
    return combine(gathered, 0)


def sharded_vote(comm: Comm, send: torch.Tensor, wire: BucketWire, combine: Combine, ledger: Ledger) -> Voted:
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
) -> Voted:
    """Parameter server co-located on rank ``root``: gather the bits, vote, broadcast.
    Workers return ``table``, the server the one its vote made."""
    plan = RootRound(
        up_name=wire.name,
        down_name=wire.name,
        gather_what=f"{wire.name} gather to server",
        broadcast_what=f"{wire.name} broadcast from server",
        up=wire.traffic(0, wire.nbytes),
        down=wire.traffic(0, wire.nbytes, result_planes),
        reply_shape=(result_planes, wire.nbytes),
        reply_dtype=torch.uint8,
        root=root,
    )
    planes, voted = exchange_at_root(comm, send, plan, lambda gathered: combine(gathered, 0), ledger)
    return planes, table if voted is None else voted


def _sum(parts: Iterable[Traffic]) -> Traffic:
    return sum(parts, Traffic())


@dataclass(frozen=True)
class Peers:
    """The ranks vote among themselves by ``exchange`` (``allgather_vote``, ``sharded_vote``);
    each learns the result's layout from the vote it runs, so ``result`` goes unread."""

    exchange: Callable[[Comm, torch.Tensor, BucketWire, Combine, Ledger], Voted]

    def vote(
        self,
        comm: Comm,
        send: torch.Tensor,
        wire: BucketWire,
        combine: Combine,
        ledger: Ledger,
        result: tuple[int, np.ndarray],
    ) -> Voted:
        return self.exchange(comm, send, wire, combine, ledger)


ALLGATHER = Peers(allgather_vote)
SHARDED = Peers(sharded_vote)


@dataclass(frozen=True)
class Server:
    """A server on rank ``root`` votes; workers size its reply from ``result``."""

    root: int = 0

    def vote(
        self,
        comm: Comm,
        send: torch.Tensor,
        wire: BucketWire,
        combine: Combine,
        ledger: Ledger,
        result: tuple[int, np.ndarray],
    ) -> Voted:
        planes, table = result
        table_t = torch.from_numpy(table).to(send.device)
        return server_vote(
            comm, send, wire, combine, ledger, result_planes=planes, table=table_t, root=self.root
        )
