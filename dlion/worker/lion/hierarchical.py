"""DistributedLion's side of the hierarchical backend (dlion.aggregate.hierarchy): the node
layout and subgroups, this rank's pieces of every bucket, the shard's momentum and sign step.

Made once per plan (DistributedLion._params_changed); the subgroups once per transport,
since every rank must make every torch.distributed group, in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from dlion.aggregate.hierarchy import NodeLayout, Piece, hierarchical_vote, node_groups, node_mean, pieces
from dlion.aggregate.topology import BucketWire, Combine
from dlion.compress.buckets import Bucket
from dlion.compress.sign import result_layout
from dlion.compress.sign_ops import SignOps
from dlion.ledger import Ledger
from dlion.transport import Comm
from dlion.wire import MASK64, ZERO_STREAM, derive_key, extend_key
from dlion.worker.lion.config import DistributedLionConfig
from dlion.worker.lion.runners import Encoded, Voted

SHARD_STATE = "exp_avg_shard"  # state[p][SHARD_STATE]: the momentum of p's piece of this rank's shard


class Owner(Protocol):
    state: Any
    ledger: Ledger
    steps_taken: int
    _comm: Comm | None
    _buckets: list[Bucket]
    _wires: list[BucketWire]
    _flat: list[tuple[torch.Tensor, dict[str, Any]]]

    def sign_ops(self) -> SignOps: ...


def procs_per_node(config: DistributedLionConfig) -> int:
    if config.procs_per_node is not None:
        return config.procs_per_node
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is None or not local.isdigit():
        raise ValueError(
            "backend 'hierarchical' needs the ranks per node: pass procs_per_node=K (dlion train "
            "--procs-per-node K), or launch with torchrun, which sets LOCAL_WORLD_SIZE"
        )
    return int(local)


@dataclass
class Hierarchy:
    owner: Owner
    layout: NodeLayout
    node: Comm
    cross: Comm
    pieces: list[list[Piece]]
    vote_rule: str
    tie: str
    seed: int

    @staticmethod
    def of(owner: Any, config: DistributedLionConfig) -> Hierarchy:
        comm = owner._comm
        layout = NodeLayout.of(comm.rank, comm.world_size, procs_per_node(config))
        # Made once per transport: a re-plan (add_param_group) keeps them.
        made = getattr(comm, "_dlion_node_groups", None)
        if made is None or made[0] != layout:
            made = (layout, *node_groups(layout, config.timeout))
            comm._dlion_node_groups = made
        _, node, cross = made
        planned = [pieces(b, layout) for b in owner._buckets]
        return Hierarchy(owner, layout, node, cross, planned, config.vote, config.tie, config.seed)

    def momentum(self, p: torch.Tensor, piece: Piece) -> torch.Tensor:
        state = self.owner.state[p]
        m = state.get(SHARD_STATE)
        if m is None or m.numel() != piece.numel:
            m = state[SHARD_STATE] = torch.zeros(piece.numel, dtype=torch.float32, device=p.device)
        return m

    def sign_step(self, k: int, grads: Sequence[torch.Tensor | None], present: np.ndarray) -> Encoded:
        """Phases 1-2 of bucket k on this rank: the node's mean gradient on its shard, then
        the Lion sign step there, with the node as the voter (its coin keys)."""
        o, bucket = self.owner, self.owner._buckets[k]
        dev = o._flat[0][0].device
        flat = torch.zeros(8 * bucket.nbytes, dtype=torch.float32, device=dev)
        for s, g in zip(bucket.slots, grads, strict=True):
            if g is not None and present[s.index]:
                flat[8 * s.byte_offset : 8 * s.byte_offset + s.numel] = g.reshape(-1)
        mean = node_mean(self.node, flat, o._wires[k], o.ledger)
        send = torch.zeros(bucket.nbytes // self.layout.per_node, dtype=torch.uint8, device=dev)
        prefix = derive_key(self.seed, ZERO_STREAM, o.steps_taken, self.layout.node)
        ops = o.sign_ops()
        for piece in self.pieces[k]:
            slot = bucket.slots[piece.slot]
            if not present[slot.index]:
                continue
            p, group = o._flat[slot.index]
            b1, b2 = group["betas"]
            # The coin of a tensor's byte j is keyed by (key, j): a piece starting at byte
            # start/8 of its tensor starts its draws there.
            key = (extend_key(prefix, slot.index) + piece.start // 8) & MASK64
            lo = piece.shard_offset
            bits = send[lo // 8 : (lo + piece.numel + 7) // 8]
            ops.sign_step(mean[lo : lo + piece.numel], self.momentum(p, piece), bits, b1, b2, key)
        return Encoded(send, [])

    def vote(self, k: int, encoded: Encoded, combine: Combine) -> Voted:
        """Phases 3-5: the cross-node sharded vote of this rank's shard, then the node's
        all_gather of the voted shards: the whole bucket's update, on every rank."""
        o = self.owner
        planes = hierarchical_vote(
            self.node, self.cross, encoded.send, o._wires[k], self.layout, combine, o.ledger
        )
        _, table = result_layout(vote=self.vote_rule, tie=self.tie, n_workers=self.layout.nodes)
        return Voted(planes, torch.from_numpy(table).to(planes.device))
