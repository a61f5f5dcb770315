"""A bucket's route through phases 3-6, chosen once per bucket when DistributedLion plans.

Every route has the same three methods, called by step() or, ahead of it, by overlap and
the DDP hook (``deferrable`` routes only):

- ``encode(grads, present, step, defer)``: the runner's fused sign step into the bucket's
  send buffer, then the encoder's corruption (an attacking rank); with ``defer`` the new
  momentum waits for ``apply``, which keeps it only if the step goes ahead;
- ``exchange(encoded, step, deferred)``: the bits cross the wire and are voted, where the
  exchange puts the vote (on every rank, on a shard, at a server);
- ``apply(voted, present, go)``: the same update on every rank, then any deferred momentum.

The routes: ``HostRoute`` (the host decides which tensors the step touches; per-tensor or flat
runners), ``DeviceRoute`` (flat CUDA buffers whose writes a device flag gates, so agreeing
on the step reads nothing back), ``HierarchicalRoute`` (dlion.worker.lion.route_hier: the
node's mean on this rank's shard). The exchange is a ``PeerExchange`` (a topology among the
ranks: dlion.aggregate) or a ``ServerExchange`` (a parameter server of its own process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch

from dlion.aggregate.votes import BucketWire, Combine, Topology
from dlion.compress.buckets import Bucket
from dlion.compress.sign import result_layout
from dlion.compress.sign_ops import SignOps
from dlion.ledger import Ledger
from dlion.server import ServerClient
from dlion.transport import Comm
from dlion.wire import TIE_STREAM, derive_key
from dlion.worker.lion.encoder import SignEncoder
from dlion.worker.lion.runners import Encoded, FlatRunnerLike, Runner, Voted

Grads = list[torch.Tensor | None]


@dataclass(frozen=True)
class Voting:
    """The vote's rule, as every rank (or the server) applies it to a bucket's packets."""

    vote: str
    tie: str
    seed: int
    ops: SignOps

    def result(self, n_voters: int) -> tuple[int, np.ndarray]:
        """(planes, table) of the voted result: every rank knows them before any byte arrives."""
        return result_layout(vote=self.vote, tie=self.tie, n_workers=n_voters)

    def combine(self, step: int, k: int) -> Combine:
        """The vote of bucket k's packets (``start``: the bucket byte they begin at)."""
        tie_key = derive_key(self.seed, TIE_STREAM, step, k)

        def combine(packets: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.ops.combine(packets, vote=self.vote, tie=self.tie, tie_key=tie_key, start=start)

        return combine


class Exchange(Protocol):
    """Phases 4-5 of a bucket: where its bits go and where the vote runs."""

    deferrable: bool  # fixed-order collectives only: may run from backward's hooks

    def vote(
        self, send: torch.Tensor, wire: BucketWire, voting: Voting, combine: Combine
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class PeerExchange:
    """Among the ranks, by the backend's topology (allgather, sharded, a server on rank 0)."""

    topology: Topology
    comm: Comm
    ledger: Ledger
    deferrable: bool

    def vote(
        self, send: torch.Tensor, wire: BucketWire, voting: Voting, combine: Combine
    ) -> tuple[torch.Tensor, torch.Tensor]:
        result = voting.result(self.comm.world_size)
        return self.topology.vote(self.comm, send, wire, combine, self.ledger, result)


@dataclass
class ServerExchange:
    """To a parameter server in a process of its own, which votes and sends the result back."""

    client: ServerClient
    n_workers: int
    deferrable: bool = False  # each step begins with a header sent from step()

    def vote(
        self, send: torch.Tensor, wire: BucketWire, voting: Voting, combine: Combine
    ) -> tuple[torch.Tensor, torch.Tensor]:
        planes, table = voting.result(self.n_workers)  # no length on the wire
        return self.client.exchange(send, wire, planes), torch.from_numpy(table)


@dataclass
class HostRoute:
    """A bucket whose step the host decides: which tensors it touches is a host list."""

    gated: ClassVar[bool] = False  # whether a device flag can gate its writes (DeviceRoute)
    k: int
    bucket: Bucket
    wire: BucketWire
    runner: Runner
    encoder: SignEncoder
    voting: Voting
    way: Exchange | None  # None: no transport yet (a world of one)
    cautious: bool
    device: torch.device

    @property
    def deferrable(self) -> bool:
        return self.way is not None and self.way.deferrable

    def encode(self, grads: Grads, present: Any, step: int, *, defer: bool) -> Encoded:
        """Phase 3 (``grads``: the bucket's, slot order). ``present`` (None: every tensor) says
        which tensors any rank has a gradient for; this rank votes g = 0 where it has none."""
        slots = self.bucket.slots
        live = [present is None or bool(present[s.index]) for s in slots]
        send = torch.zeros(self.bucket.nbytes, dtype=torch.uint8, device=self.device)
        keep = self.runner.sign_step(grads, live, send, self.encoder.keys(step, slots), defer=defer)
        self.encoder.corrupt(send, slots, live, step)
        return Encoded(send, keep)

    def exchange(self, encoded: Encoded, step: int, *, deferred: bool) -> Voted:
        """Phases 4-5."""
        assert self.way is not None, "a bucket is exchanged only with a transport"
        combine = self.voting.combine(step, self.k)
        planes, table = self.way.vote(encoded.send, self.wire, self.voting, combine)
        return Voted(planes, table, deferred, encoded.keep)

    def apply(self, voted: Voted, present: Any, go: torch.Tensor | None = None) -> None:
        """Phase 6, then the deferred momentum of the tensors the step keeps."""
        live = [bool(present[s.index]) for s in self.bucket.slots]
        self.runner.apply(voted.planes, voted.table, live, self.cautious)
        if voted.deferred:
            self.runner.commit(live)


@dataclass
class DeviceRoute(HostRoute):
    """Flat CUDA buffers: with ``go`` (the ranks agreed on the device), ``present`` is a device
    bool[T] and the kernels write only if go[0], so the host decides nothing."""

    gated: ClassVar[bool] = True
    slot_ids: torch.Tensor | None = None  # this bucket's tensor indices (device int64)

    def apply(self, voted: Voted, present: Any, go: torch.Tensor | None = None) -> None:
        if go is None:
            return super().apply(voted, present)
        assert isinstance(self.runner, FlatRunnerLike) and self.slot_ids is not None
        on = present[self.slot_ids]
        self.runner.apply_gated(voted.planes, voted.table, on, self.cautious, go)
        if voted.deferred:
            self.runner.commit_gated(on, go)
