"""The hierarchical route (dlion.aggregate.hierarchy): the ranks of a node average their
gradients on this rank's shard of the bucket, the node takes the Lion sign step there as one
voter, nodes vote sharded across nodes, and each node gathers the voted shards.

Made once per plan; the node subgroups once per transport (``node_groups_for``), since every
rank must make every torch.distributed group, in the same order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from dlion.aggregate.hierarchy import NodeLayout, Piece, hierarchical_vote, node_groups_for, node_mean
from dlion.ledger import Ledger
from dlion.transport import Comm
from dlion.wire import MASK64, ZERO_STREAM, derive_key, extend_key
from dlion.worker.lion.routes import Grads, HostRoute
from dlion.worker.lion.runners import Encoded, Owner, Voted

SHARD_STATE = "exp_avg_shard"  # state[p][SHARD_STATE]: the momentum of p's piece of this rank's shard


def procs_per_node(configured: int | None) -> int:
    """The ranks per node: as configured, else the launcher's LOCAL_WORLD_SIZE."""
    if configured is not None:
        return configured
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None or not local.isdigit():
        raise ValueError(
            "backend 'hierarchical' needs the ranks per node: pass procs_per_node=K (dlion train "
            "--procs-per-node K), or launch with torchrun, which sets LOCAL_WORLD_SIZE"
        )
    return int(local)


@dataclass(frozen=True)
class Nodes:
    """This rank's place among the nodes, and the node and cross-node transports."""

    layout: NodeLayout
    node: Comm
    cross: Comm

    @staticmethod
    def of(comm: Comm, configured: int | None, timeout: timedelta | None) -> Nodes:
        layout = NodeLayout.of(comm.rank, comm.world_size, procs_per_node(configured))
        return Nodes(layout, *node_groups_for(comm, layout, timeout))


@dataclass
class HierarchicalRoute(HostRoute):
    """Encode and exchange on the node's shard; apply as a host route, on the whole bucket."""

    nodes: Nodes | None = None
    owner: Owner | None = None  # the shard momenta live in the optimizer's state
    ledger: Ledger | None = None
    pieces: list[Piece] = field(default_factory=list)

    @property
    def deferrable(self) -> bool:
        return False  # a node's mean first: nothing starts during backward

    def _momentum(self, p: torch.Tensor, piece: Piece) -> torch.Tensor:
        assert self.owner is not None
        state = self.owner.state[p]
        m = state.get(SHARD_STATE)
        if m is None or m.numel() != piece.numel:
            m = state[SHARD_STATE] = torch.zeros(piece.numel, dtype=torch.float32, device=p.device)
        return m

    def encode(self, grads: Grads, present: Any, step: int, *, defer: bool) -> Encoded:
        """The node's mean gradient on this rank's shard, then the Lion sign step there, with
        the node as the voter (its coin keys)."""
        assert self.nodes is not None and self.owner is not None and self.ledger is not None
        assert not defer and present is not None, "the hierarchical route runs whole in step()"
        bucket, layout = self.bucket, self.nodes.layout
        flat = torch.zeros(8 * bucket.nbytes, dtype=torch.float32, device=self.device)
        for s, g in zip(bucket.slots, grads, strict=True):
            if g is not None and present[s.index]:
                flat[8 * s.byte_offset : 8 * s.byte_offset + s.numel] = g.reshape(-1)
        mean = node_mean(self.nodes.node, flat, self.wire, self.ledger)
        send = torch.zeros(bucket.nbytes // layout.per_node, dtype=torch.uint8, device=self.device)
        prefix = derive_key(self.encoder.seed, ZERO_STREAM, step, layout.node)
        pairs = self.owner.pairs(bucket)
        for piece in self.pieces:
            slot = bucket.slots[piece.slot]
            if not present[slot.index]:
                continue
            p, group = pairs[piece.slot]
            b1, b2 = group["betas"]
            # The coin of a tensor's byte j is keyed by (key, j): a piece starting at byte
            # start/8 of its tensor starts its draws there.
            key = (extend_key(prefix, slot.index) + piece.start // 8) & MASK64
            lo = piece.shard_offset
            bits = send[lo // 8 : (lo + piece.numel + 7) // 8]
            self.voting.ops.sign_step(
                mean[lo : lo + piece.numel], self._momentum(p, piece), bits, b1, b2, key
            )
        return Encoded(send, [])

    def exchange(self, encoded: Encoded, step: int, *, deferred: bool) -> Voted:
        """The cross-node sharded vote of this rank's shard, then the node's all_gather of the
        voted shards: the whole bucket's update, on every rank."""
        assert self.nodes is not None and self.ledger is not None
        n = self.nodes
        combine = self.voting.combine(step, self.k)
        planes = hierarchical_vote(n.node, n.cross, encoded.send, self.wire, n.layout, combine, self.ledger)
        _, table = self.voting.result(n.layout.nodes)
        return Voted(planes, torch.from_numpy(table).to(planes.device))
