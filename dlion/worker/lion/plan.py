"""DistributedLion's plan: its buckets, and each bucket's route (runner, encoder, exchange),
chosen here and nowhere else, for the parameters and the world of now.

Made at build, after add_param_group, and when the transport comes late
(DistributedLion._params_changed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dlion.aggregate.backends import align_bytes, sign_topology
from dlion.aggregate.hierarchy import pieces
from dlion.aggregate.votes import BucketWire
from dlion.compress.buckets import Bucket, plan_buckets
from dlion.compress.sign_ops import ops_for
from dlion.ledger import Ledger
from dlion.server import ServerClient
from dlion.transport import Comm
from dlion.transport.base import torch_group_of
from dlion.worker.core.byzantine import attack_of
from dlion.worker.core.sharding import REPLICATED, Sharding
from dlion.worker.lion.config import DistributedLionConfig
from dlion.worker.lion.encoder import SignEncoder
from dlion.worker.lion.route_hier import HierarchicalRoute, Nodes
from dlion.worker.lion.routes import DeviceRoute, Exchange, HostRoute, PeerExchange, ServerExchange, Voting
from dlion.worker.lion.runners import Owner, Runner, TensorRunner, can_be_flat


@dataclass
class LionPlan:
    buckets: list[Bucket]
    wires: list[BucketWire]
    routes: list[HostRoute]
    on_device: bool  # the ranks agree on the device: every route gated, a torch transport

    @property
    def runners(self) -> list[Runner]:
        return [r.runner for r in self.routes]

    @property
    def deferrable(self) -> bool:
        """Whether every bucket may start during backward (overlap, the DDP hook)."""
        return all(r.deferrable for r in self.routes)


@dataclass(frozen=True)
class World:
    """Who this rank is, what it talks over and records to, for the life of the plan."""

    comm: Comm | None
    rank: int
    world_size: int
    ledger: Ledger
    server: ServerClient | None = None  # a dedicated parameter server
    sharding: Sharding = REPLICATED  # FSDP2's local shards: each keeps its storage, no flat buffers


def plan_lion(
    owner: Owner,
    pairs: Sequence[tuple[torch.Tensor, dict[str, Any]]],
    cfg: DistributedLionConfig,
    world: World,
) -> LionPlan:
    """The buckets of these (parameter, group) pairs, and a route each."""
    _check_sharded(cfg, world)
    align = align_bytes(cfg.backend, world.world_size)
    buckets = plan_buckets([p.numel() for p, _ in pairs], cfg.bucket_numel, align)
    device = pairs[0][0].device
    ops = ops_for(device)
    seed = world.sharding.seed_of(cfg.seed)
    encoder = SignEncoder(
        seed,
        world.rank,
        cfg.binarize == "stochastic",
        attack_of(cfg.byzantine, world.rank, world.world_size),
    )
    voting = Voting(cfg.vote, cfg.tie, seed, ops)
    nodes = None
    if cfg.backend == "hierarchical" and world.comm is not None:
        nodes = Nodes.of(world.comm, cfg.procs_per_node, cfg.timeout)
    way = _exchange(cfg, world) if nodes is None else None  # the nodes' route has its own
    # The flat kernels sign plainly, and would move a shard out of FSDP's storage.
    per_tensor = encoder.stochastic or cfg.backend == "hierarchical" or world.sharding.sharded
    routes: list[HostRoute] = []
    for k, bucket in enumerate(buckets):
        wire = BucketWire.of(f"bucket{k}", bucket)
        if per_tensor or not can_be_flat([pairs[s.index][0] for s in bucket.slots]):
            runner: Runner = TensorRunner(owner, bucket, ops, encoder.binarize(ops))
        else:
            from dlion.worker.lion.flat import FlatRunner  # loads the CUDA kernels: flat buckets only

            runner = FlatRunner(owner, bucket)
        common = (k, bucket, wire, runner, encoder, voting, way, cfg.cautious_wd, device)
        if nodes is not None:
            cut = pieces(bucket, nodes.layout)
            routes.append(
                HierarchicalRoute(*common, nodes=nodes, owner=owner, ledger=world.ledger, pieces=cut)
            )
        elif runner.flat and isinstance(way, PeerExchange) and encoder.attack is None:
            ids = torch.tensor([s.index for s in bucket.slots], dtype=torch.int64, device=device)
            routes.append(DeviceRoute(*common, slot_ids=ids))
        else:  # per tensor, or a server's header or an attacker's bits: the host decides
            routes.append(HostRoute(*common))
    torch_transport = world.comm is not None and torch_group_of(world.comm) is not None
    on_device = torch_transport and all(r.gated for r in routes)
    return LionPlan(buckets, [r.wire for r in routes], routes, on_device)


def _exchange(cfg: DistributedLionConfig, world: World) -> Exchange | None:
    if world.comm is None:
        return None
    if world.server is not None:
        return ServerExchange(world.server, world.comm.world_size)
    topology = sign_topology(cfg.backend)
    return PeerExchange(topology, world.comm, world.ledger, deferrable=cfg.launches_in_backward)


def _check_sharded(cfg: DistributedLionConfig, world: World) -> None:
    """FSDP2's shards are voted across their replicas in step(), over the mesh's replicate
    dimension (dlion.worker.core.sharding): what needs whole tensors or another group is refused."""
    if not world.sharding.sharded:
        return
    refused = {
        "backend='hierarchical'": cfg.backend == "hierarchical",  # FSDP's reduce-scatter is the node's mean
        "a dedicated server (server=)": world.server is not None,
        "overlap=True": cfg.overlap,
    }
    named = [k for k, bad in refused.items() if bad]
    if named:
        raise ValueError(
            f"DistributedLion over FSDP-sharded parameters does not take {named[0]}: FSDP's reduce-scatter "
            "already averages inside the shard group, and each shard votes across its replicas in step() "
            "with backend 'sharded', 'allgather' or 'server' (on the first replica)"
        )
