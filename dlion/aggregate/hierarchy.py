"""The hierarchical vote: nodes are the voters, and the slow links between nodes carry bits only.

N = H x K ranks, K per node (rank = node * K + local rank). For each bucket of S bytes
(8 S elements), local rank l owns shard l, bytes [l S/K, (l+1) S/K):

1. Inside the node, the gradients are reduce-scattered in fp32: an all_to_all of shards,
   summed in local-rank order and divided by K (a fixed order: deterministic), so rank l
   holds its node's mean gradient on shard l.
2. Rank l keeps the Lion momentum of shard l only (momentum memory / K), takes the sign
   step there, and votes with the ranks of local rank l on the other nodes: the sharded
   vote over H (all_to_all, vote, all_gather of bits).
3. Inside the node again, an all_gather of the voted shards (B bits per parameter), so
   every rank applies the same update.

What changes in the algorithm: H voters, each with K times the batch (its node's mean
gradient). Between nodes, each rank moves 2 (H-1)/H x 1/K bits per parameter each way for
a 1-bit result, and the K local ranks of a node use K network paths at once.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from dlion.aggregate.votes import BucketWire, Combine, sharded_vote
from dlion.checks import check_int
from dlion.compress.buckets import Bucket
from dlion.ledger import CollectiveRecord, Ledger, Traffic
from dlion.transport import Comm, TorchComm

NODE = "node"  # the ledger's scope of intra-node collectives


@dataclass(frozen=True)
class NodeLayout:
    """Where a rank sits: node ``node`` of ``nodes``, local rank ``local`` of ``per_node``."""

    per_node: int
    nodes: int
    node: int
    local: int

    @staticmethod
    def of(rank: int, world_size: int, per_node: int) -> NodeLayout:
        check_int("procs_per_node", per_node, low=1)
        if world_size % per_node:
            raise ValueError(
                f"the hierarchical backend needs whole nodes: world size {world_size} is not a multiple "
                f"of procs_per_node {per_node}"
            )
        return NodeLayout(per_node, world_size // per_node, rank // per_node, rank % per_node)


@dataclass(frozen=True)
class Piece:
    """The part of one tensor inside this rank's shard of a bucket."""

    slot: int  # position in the bucket's slots
    start: int  # first element, within the tensor (a multiple of 8)
    numel: int
    shard_offset: int  # first element, within the shard


def pieces(bucket: Bucket, layout: NodeLayout) -> list[Piece]:
    """This rank's pieces of ``bucket``: its shard is bytes [l S/K, (l+1) S/K)."""
    s = bucket.nbytes // layout.per_node
    lo, hi = 8 * s * layout.local, 8 * s * (layout.local + 1)
    out = []
    for j, slot in enumerate(bucket.slots):
        a, b = max(lo, 8 * slot.byte_offset), min(hi, 8 * slot.byte_offset + slot.numel)
        if a < b:
            out.append(Piece(j, a - 8 * slot.byte_offset, b - a, a - lo))
    return out


def node_groups(layout: NodeLayout, timeout: timedelta | None) -> tuple[Comm, Comm]:
    """(this node's K ranks, the H ranks of this local rank): every rank makes every group,
    in one order, as torch.distributed requires."""
    k, h = layout.per_node, layout.nodes
    node = cross = None
    for n in range(h):
        g = dist.new_group([n * k + j for j in range(k)])
        node = g if n == layout.node else node
    for j in range(k):
        g = dist.new_group([n * k + j for n in range(h)])
        cross = g if j == layout.local else cross
    return TorchComm(node, timeout), TorchComm(cross, timeout)


# Per transport: (layout, node, cross). Weak keys, so a transport's groups go with it.
_MADE: weakref.WeakKeyDictionary[Comm, tuple[NodeLayout, Comm, Comm]] = weakref.WeakKeyDictionary()


def node_groups_for(comm: Comm, layout: NodeLayout, timeout: timedelta | None) -> tuple[Comm, Comm]:
    """``node_groups`` made once per transport ``comm`` (again only if ``layout`` changes).

    Making groups is a collective of the whole world (every rank makes every group, in one
    order), so a re-plan after add_param_group reuses these instead of making, and leaking,
    new ones. The groups keep the ``timeout`` they were made with.
    """
    made = _MADE.get(comm)
    if made is None or made[0] != layout:
        made = _MADE[comm] = (layout, *node_groups(layout, timeout))
    return made[1], made[2]


def node_mean(node: Comm, flat: torch.Tensor, wire: BucketWire, ledger: Ledger) -> torch.Tensor:
    """Phase 1: ``flat`` (float32 [8 S], the bucket's gradient layout) -> this rank's shard of
    the node's mean gradient (float32 [8 S / K]), summed in local-rank order."""
    k, me = node.world_size, node.rank
    rows = node.all_to_all(flat, f"{wire.name} gradient reduce_scatter").to(flat.device)
    s = wire.nbytes // k
    up = sum((wire.traffic(j * s, (j + 1) * s, 32) for j in range(k) if j != me), Traffic())
    down = wire.traffic(me * s, (me + 1) * s, 32) * (k - 1)
    ledger.record(CollectiveRecord(f"{wire.name}.grads", "all_to_all", k, up, down, scope=NODE))
    total = rows[0].clone()
    for r in range(1, k):
        total += rows[r]
    return total / k


def shard_wire(wire: BucketWire, layout: NodeLayout) -> BucketWire:
    """The wire of this rank's shard, as the cross-node vote sees it (shard coordinates)."""
    s = wire.nbytes // layout.per_node
    lo, hi = 8 * s * layout.local, 8 * s * (layout.local + 1)
    ranges = tuple(
        (max(a, lo) - lo, min(b, hi) - lo) for a, b in wire.payload_ranges if max(a, lo) < min(b, hi)
    )
    return BucketWire(f"{wire.name}[shard {layout.local}]", s, ranges)


def hierarchical_vote(
    node: Comm,
    cross: Comm,
    send: torch.Tensor,
    wire: BucketWire,
    layout: NodeLayout,
    combine: Combine,
    ledger: Ledger,
) -> torch.Tensor:
    """Phases 2-3: ``send`` (uint8 [S / K], this rank's shard of sign bits) voted with the
    same shard of the other nodes, then gathered inside the node -> planes [B, S]."""
    s = wire.nbytes // layout.per_node
    base = layout.local * s

    def shifted(packets: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        return combine(packets, base + start)  # tie coins keyed by the bucket's bytes

    mine = shard_wire(wire, layout)
    planes, _ = sharded_vote(cross, send, mine, shifted, ledger)
    b = planes.shape[0]
    gathered = node.all_gather(planes.contiguous().view(-1), f"{wire.name} node all_gather").to(send.device)
    k, me = node.world_size, node.rank
    up = sum((wire.traffic(j * s, (j + 1) * s, b) for j in range(k) if j != (me + 1) % k), Traffic())
    down = sum((wire.traffic(j * s, (j + 1) * s, b) for j in range(k) if j != me), Traffic())
    ledger.record(CollectiveRecord(f"{wire.name}.node_result", "all_gather", k, up, down, scope=NODE))
    return gathered.view(k, b, s).permute(1, 0, 2).reshape(b, k * s)
