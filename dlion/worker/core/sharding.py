"""How an optimizer's parameters are laid out: plain tensors (every rank a full replica, DDP or
no wrapper), or FSDP2's DTensors, sharded along dimension 0 over a mesh dimension, on a 1-D
mesh (FSDP) or a 2-D one whose other dimension replicates (HSDP).

Chosen once per set of param groups (``sharding_of``). A sharded optimizer works on each
parameter's local shard (``to_local``): its gradient after FSDP's reduce-scatter, its momentum
of the shard's size. The ranks that hold the same shard, one per replica, are the voters: the
mesh's replicate dimension is the optimizer's process group. A 1-D mesh has no replicas, so
nothing is voted: each shard takes plain Lion on FSDP's mean gradient.

The roles of the mesh's dimensions are read from the placements FSDP gave the parameters
(``Replicate()`` and ``Shard(0)``), not from the mesh's names, which differ between stacks
(torchtitan's "dp_replicate" and "dp_shard_cp", Accelerate's, a user's own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dlion.aggregate.meta import StepMeta
from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic
from dlion.transport import Comm, make_comm
from dlion.transport.base import torch_group_of
from dlion.wire import SHARD_STREAM, derive_key
from dlion.worker.core.checks import first_nonfinite

try:  # torch.distributed is optional in a torch build
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - builds without distributed
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


@dataclass(frozen=True)
class Sharding:
    """The layout of every parameter of one optimizer; ``mesh`` None: plain tensors."""

    mesh: Any = None  # torch.distributed.DeviceMesh
    placements: tuple[Any, ...] = ()  # every parameter's, the same
    replicate_dim: int | None = None  # the mesh dimension the replicas lie along (HSDP)
    shard_dim: int | None = None  # the mesh dimension dim 0 of every parameter is split along

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    @property
    def replicas(self) -> int:
        """How many ranks hold each shard: the voters."""
        return 1 if self.replicate_dim is None else int(self.mesh.size(self.replicate_dim))

    @property
    def shards(self) -> int:
        return 1 if self.shard_dim is None else int(self.mesh.size(self.shard_dim))

    @property
    def group_may_come_later(self) -> bool:
        """Whether the process group may be made after the optimizer (Hugging Face's arguments
        make it): for plain tensors; a DTensor's mesh exists with its groups."""
        return not self.sharded

    def digestible(self, grads: Sequence[torch.Tensor | None]) -> Sequence[torch.Tensor | None]:
        """The gradients the averaged-gradient guard may compare (dlion.worker.core.guard): none
        under FSDP, where the guard would name DDP and DistributedLion's own warning says what
        to do (NOT_ATTACHED)."""
        return [] if self.sharded else grads

    def seed_of(self, seed: int) -> int:
        """The seed of this rank's coins: a shard's positions are local, so each shard group
        keys its own (the replicas of one shard share it, as the vote needs)."""
        if self.shard_dim is None:
            return seed
        return derive_key(seed, SHARD_STREAM, int(self.mesh.get_local_rank(self.shard_dim)))

    def replicate_group(self) -> Any:
        """The process group of this rank's replicas (None: no replicas)."""
        return None if self.replicate_dim is None else self.mesh.get_group(self.replicate_dim)

    def shard_group(self) -> Any:
        """The process group of this rank's shard group (None: one shard)."""
        return None if self.shards == 1 else self.mesh.get_group(self.shard_dim)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor this rank holds: a DTensor's local shard (a view of its storage)."""
        return t.to_local() if self.sharded else t  # type: ignore[attr-defined]

    def locals(self, ts: Sequence[torch.Tensor | None]) -> list[Any]:
        if not self.sharded:
            return list(ts)
        return [None if t is None else t.to_local() for t in ts]  # type: ignore[attr-defined]

    # ---- saved state: each replica's state is its own, so it is saved as a DTensor with a
    # leading replica dimension that DCP shards (not a plain tensor, which DCP would take as
    # replicated and save from one rank only).

    def to_saved(self, value: torch.Tensor, p: torch.Tensor) -> Any:
        """A per-rank state tensor of p's local shape, as a DTensor of shape (replicas, *p.shape)."""
        if not self.sharded or value.shape != self.local(p).shape:
            return value
        placements = [Shard(0) if d == self.replicate_dim else Shard(1) for d in range(self.mesh.ndim)]
        shape = torch.Size((self.replicas, *p.shape))
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(
            value.unsqueeze(0), self.mesh, placements, run_check=False, shape=shape, stride=stride
        )

    def from_saved(self, value: Any, p: torch.Tensor, owner: str) -> Any:
        if not is_dtensor(value):
            return value
        if tuple(value.shape[1:]) != tuple(p.shape):
            raise ValueError(
                f"{owner}.load_state_dict: a saved state of shape {tuple(value.shape)} belongs to a "
                f"parameter of shape {tuple(value.shape[1:])}, not {tuple(p.shape)}: another model"
            )
        if value.shape[0] != self.replicas:
            raise ValueError(
                f"{owner}.load_state_dict: a saved state of shape {tuple(value.shape)} is "
                f"{(self.replicas, *p.shape)} here: each replica's momentum is its own, so "
                f"resume with {value.shape[0]} replicas (the shard group's size may change)"
            )
        return value.to_local()[0]


REPLICATED = Sharding()


def sharding_of(owner: str, params: Sequence[torch.Tensor], names: Sequence[str]) -> Sharding:
    """The one layout of ``params``, or a ValueError naming the parameter that breaks it."""
    dts = [is_dtensor(p) for p in params]
    if not any(dts):
        return REPLICATED
    if not all(dts):
        plain = names[dts.index(False)]
        raise ValueError(
            f"{owner} got FSDP-sharded (DTensor) and plain parameters together ({plain} is plain): "
            "shard every module the optimizer trains with fully_shard, or give the plain ones their own "
            "optimizer"
        )
    first: Any = params[0]
    mesh, placements = first.device_mesh, tuple(first.placements)
    dparams: Sequence[Any] = params
    for p, name in zip(dparams, names, strict=True):
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise ValueError(
                f"{owner}: {name} is placed {tuple(p.placements)} on {p.device_mesh}, "
                f"{names[0]} {placements} on {mesh}: every parameter must be sharded on the same mesh"
            )
    return Sharding(mesh, placements, *_roles(owner, names[0], mesh, placements))


def _roles(owner: str, name: str, mesh: Any, placements: tuple[Any, ...]) -> tuple[int | None, int]:
    """(replicate dim, shard dim) from FSDP's placements: Shard(0) on one dimension, Replicate
    on the other if there are two."""
    shard = [d for d, pl in enumerate(placements) if isinstance(pl, Shard)]
    rep = [d for d, pl in enumerate(placements) if isinstance(pl, Replicate)]
    fsdp_like = (
        mesh.ndim in (1, 2)
        and len(shard) == 1
        and placements[shard[0]] == Shard(0)
        and len(rep) == mesh.ndim - 1
    )
    if not fsdp_like:
        raise ValueError(
            f"{owner}: {name} is placed {placements} on a {mesh.ndim}-D mesh {mesh.mesh_dim_names}; "
            "dlion trains FSDP2's layouts: Shard(0) on a 1-D mesh, or (Replicate(), Shard(0)) on a 2-D "
            "(replicate, shard) mesh; parameters sharded otherwise (Shard(d) for d > 0, tensor "
            "parallel) are not voted"
        )
    return (rep[0] if rep else None), shard[0]


def verdict_across_shards(comm: Comm, bad_rank: int, bad_index: int, ledger: Ledger) -> tuple[int, int]:
    """The step's verdict, the same in every shard group: (the global rank of a rank whose
    gradient is not finite, its tensor), or (-1, -1); ``bad_rank``: this rank's view, global.
    The replicas of a shard agreed among themselves; a shard group whose shard goes on while
    another's skips (or raises) would leave the model half-stepped, or the others waiting in
    FSDP's next all-gather. One all_gather of 2 int64 over the shard group (inside the node),
    recorded in scope "node"."""
    me = torch.tensor([bad_rank, bad_index], dtype=torch.int64)
    seen = comm.all_gather(me.to(comm.device), "shard verdict").cpu().reshape(-1, 2)
    n = comm.world_size
    sent, received = all_gather_traffic(Traffic(metadata=8 * me.numel() * me.element_size()), n)
    if ledger.in_step:
        ledger.record(CollectiveRecord("shard.verdict", "all_gather", n, sent, received, scope="node"))
    bad = [(int(r), int(i)) for r, i in seen.tolist() if r >= 0]
    return bad[0] if bad else (-1, -1)


def verdict_of_shards(comm: Comm, grads: Sequence[torch.Tensor | None], ledger: Ledger) -> tuple[int, int]:
    """``verdict_across_shards`` on a 1-D mesh, where nothing else agrees: this rank's own scan,
    inside a ledger step (FSDP's collectives may have opened it under dlion.attach)."""
    opened = not ledger.in_step
    if opened:
        ledger.begin_step()
    try:
        bad = first_nonfinite(grads)
        return verdict_across_shards(comm, dist.get_rank() if bad >= 0 else -1, bad, ledger)
    finally:
        if opened:
            ledger.end_step()


def comms_of(
    sharding: Sharding, group: Any, transport: str, timeout: timedelta | None, owner: str
) -> tuple[Comm | None, Comm | None]:
    """An optimizer's transports: over its process group (``group``; None: the default one, or
    none yet) for plain tensors; for sharded ones, across the mesh's replicate dimension (the
    voters; None on a 1-D mesh: nothing to vote), and across its shard group (where the step's
    verdict is agreed too; None for one shard)."""
    if not sharding.sharded:
        return make_comm(group, timeout, transport), None
    if group is not None or transport != "torch":
        raise ValueError(
            f"{owner} over FSDP-sharded parameters votes across the mesh's replicate dimension: pass "
            f"no process_group (got {group!r}) and transport='torch' (got {transport!r})"
        )
    replicas, shards = sharding.replicate_group(), sharding.shard_group()
    return (
        None if replicas is None else make_comm(replicas, timeout),
        None if shards is None else make_comm(shards, timeout),
    )


def agree_across_shards(comm: Comm | None, meta: StepMeta, ledger: Ledger, replicas: Comm) -> StepMeta:
    """The step's metadata with the verdict of every shard group (``verdict_across_shards``),
    its bad rank a global rank; ``meta`` itself without a shard group to agree with.
    ``replicas``: the transport ``meta`` was agreed over, whose ranks it names."""
    if comm is None:
        return meta
    bad = meta.bad_rank
    if bad >= 0:
        bad = dist.get_global_rank(torch_group_of(replicas), bad)
    rank, index = verdict_across_shards(comm, bad, meta.bad_index, ledger)
    return dataclasses.replace(meta, bad_rank=rank, bad_index=index)
