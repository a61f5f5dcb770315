"""``dlion.attach`` under FSDP2 (``fully_shard``): the replicas vote, FSDP shards.

On a 2-D (replicate, shard) mesh (HSDP), FSDP reduce-scatters each gradient inside the shard
group (fast links: a node), then all-reduces the shard across replicas (the slow network), in
fp32 or bf16. ``attach(fsdp_model, optimizer)``:

1. silences that all-reduce and leaves each rank's ``p.grad`` its shard group's mean gradient:
   each FSDP parameter group's mesh becomes the shard dimension alone, so FSDP's
   reduce-scatter runs as before and no collective crosses replicas. (FSDP2's public switches
   do not do this: ``set_requires_all_reduce(False)`` sends nothing but keeps the reduced
   shard in a private accumulator, leaving ``p.grad`` None; ``set_all_reduce_hook`` runs after
   the all-reduce, whose bytes are then already spent. Measured in tests/test_fsdp.py.)
2. DistributedLion, built over the model's DTensor parameters, votes each local shard across
   the replicas in step() (dlion.worker.core.sharding), applies the vote to the shard, and
   FSDP's all-gather serves the next forward;
3. FSDP's own collectives inside the shard group (the parameters' all-gathers, the gradients'
   reduce-scatters) are counted in the optimizer's ledger as they run, in the "node" scope,
   beside dlion's bytes across replicas: a user sees both.

A 1-D mesh has no replicas: nothing is silenced or voted; the ledger still counts FSDP's
collectives. ``detach()`` gives FSDP back its all-reduce and its collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard

from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic, all_reduce_traffic
from dlion.worker.core.state import unwrapped
from dlion.worker.lion.distributed_lion import DistributedLion

try:  # FSDP2's internals, read and swapped in this module alone (tested with torch 2.13)
    from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
    from torch.distributed.fsdp._fully_shard._fsdp_common import FSDPMeshInfo, HSDPMeshInfo
except ImportError:  # pragma: no cover - another torch
    AllGather = ReduceScatter = FSDPMeshInfo = HSDPMeshInfo = None  # type: ignore[assignment,misc]


def holds_fsdp(model: Any) -> bool:
    return isinstance(model, torch.nn.Module) and any(isinstance(m, FSDPModule) for m in model.modules())


def _param_groups(module: FSDPModule) -> list[Any]:
    """FSDP2's parameter groups of one module (internal to torch: refused by name if gone)."""
    groups = getattr(fully_shard.state(module), "_fsdp_param_groups", None)  # type: ignore[attr-defined]
    if groups is None or FSDPMeshInfo is None or any(not hasattr(g, "mesh_info") for g in groups):
        raise RuntimeError(
            f"dlion.attach reads FSDP2's parameter groups, which this torch ({torch.__version__}) lays "
            "out differently (tested with 2.13): use DistributedLion without attach, or that torch"
        )
    return list(groups)


class _Counted:
    """FSDP's all-gather or reduce-scatter, counted in the ledger as it runs (scope "node":
    inside the shard group)."""

    def __init__(self, inner: Any, ledger: Ledger, op: str) -> None:
        self.inner, self.ledger, self.op = inner, ledger, op

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.inner.allocate(size, dtype=dtype, device=device)

    def __call__(
        self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: Any, *a: Any, **k: Any
    ) -> Any:
        n = dist.get_world_size(group)
        if n > 1:
            sent, received = self._traffic(output_tensor, input_tensor, group, n)
            if not self.ledger.in_step:  # forward and backward come before step(), which closes it
                self.ledger.begin_step()
            self.ledger.record(CollectiveRecord(f"fsdp.{self.op}", self.op, n, sent, received, scope="node"))
        return self.inner(output_tensor, input_tensor, group, *a, **k)

    def _traffic(
        self, output: torch.Tensor, input: torch.Tensor, group: Any, n: int
    ) -> tuple[Traffic, Traffic]:
        """A ring's bytes: (n-1) shards each way, the shard being this rank's part (all_gather's
        input, reduce_scatter's output). Gloo runs reduce_scatter_tensor as an all-reduce of the
        whole input, measured on the wire at 2 (n-1)/n of it: counted as it runs."""
        if self.op == "reduce_scatter" and dist.get_backend(group) == "gloo":
            return all_reduce_traffic(Traffic(payload=8 * input.numel() * input.element_size()), n)
        shard = output if self.op == "reduce_scatter" else input
        return all_gather_traffic(Traffic(payload=8 * shard.numel() * shard.element_size()), n)


class CountedAllGather(_Counted, *(() if AllGather is None else (AllGather,))):  # type: ignore[misc]
    pass


class CountedReduceScatter(_Counted, *(() if ReduceScatter is None else (ReduceScatter,))):  # type: ignore[misc]
    pass


# What attach changes in each FSDP parameter group, and detach puts back.
SWAPPED = ("mesh_info", "post_forward_mesh_info", "_all_gather_comm", "_reduce_scatter_comm")


class FsdpAttachment:
    """The handle ``attach`` returns for an FSDP2 model; ``detach()`` restores FSDP's own
    all-reduce and collectives."""

    def __init__(self, model: torch.nn.Module, optimizer: DistributedLion) -> None:
        self.model, self.optimizer = model, optimizer
        self._modules = [m for m in model.modules() if isinstance(m, FSDPModule)]  # found once
        self._saved: list[tuple[Any, dict[str, tuple[Any, Any]]]] = []  # group, {name: (before, installed)}
        self._hooks: list[Any] = []

    @property
    def attached(self) -> bool:
        return bool(self._saved)

    @property
    def vote_in_step(self) -> bool:
        return True  # after FSDP's reduce-scatter, in step(): clipping and accumulation reach it

    def _attach(self) -> None:
        ledger = self.optimizer.ledger
        for module in self._modules:
            for g in _param_groups(module):
                if any(g is seen for seen, _ in self._saved):
                    continue  # one group held by several modules (fully_shard([norm, lm_head]))
                if isinstance(g._all_gather_comm, _Counted):
                    self.detach()
                    raise ValueError(
                        "dlion.attach: this FSDP model is attached to a DistributedLion already; "
                        "detach() that attachment first"
                    )
                before = {name: getattr(g, name) for name in SWAPPED}
                old = g.mesh_info
                if isinstance(old, HSDPMeshInfo):  # the replica all-reduce goes; the vote replaces it
                    g.mesh_info = FSDPMeshInfo(old.mesh, shard_mesh_dim=old.shard_mesh_dim)
                    g.mesh_info.reduce_scatter_process_group = old.reduce_scatter_process_group
                    if g.post_forward_mesh_info is old:  # resharding after forward keeps to its mesh
                        g.post_forward_mesh_info = g.mesh_info
                g._all_gather_comm = CountedAllGather(g._all_gather_comm, ledger, "all_gather")
                rs = g._reduce_scatter_comm
                g._reduce_scatter_comm = CountedReduceScatter(rs, ledger, "reduce_scatter")
                self._saved.append((g, {n: (v, getattr(g, n)) for n, v in before.items()}))
        self._hooks = [
            self.optimizer.register_step_pre_hook(self._reshard),
            self.optimizer.register_step_post_hook(_close_step),
        ]

    def _reshard(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before the step writes the shards: FSDP2 keeps a root group unsharded after forward,
        so a forward since the last backward (an evaluation) would otherwise serve the next
        forward the weights from before this step."""
        for module in self._modules:
            module.reshard()

    def detach(self) -> None:
        for g, values in self._saved:
            for name, (before, installed) in values.items():
                if getattr(g, name) is installed:  # what FSDP set since (its lazy init) stays
                    setattr(g, name, before)
        self._saved = []
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.optimizer.sharded_attached = False


def _close_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """A step that sent nothing itself (a 1-D mesh) closes the one FSDP's collectives opened."""
    if optimizer.ledger.in_step:
        optimizer.ledger.end_step()


def attach_fsdp(model: torch.nn.Module, optimizer: Any) -> FsdpAttachment:
    """Vote across replicas in place of FSDP's all-reduce (module doc). ``optimizer``: a
    DistributedLion built after ``fully_shard`` over the model's (DTensor) parameters."""
    opt = unwrapped(optimizer, DistributedLion, "dlion.attach needs a dlion.DistributedLion optimizer")
    opt.refresh_params()  # Accelerate's prepare swaps the DTensors into the optimizer's groups
    if opt.sharded_attached:
        raise ValueError(
            "dlion.attach: this DistributedLion is attached to an FSDP model already; detach() the "
            "first attachment before attaching again"
        )
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    trained = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    orphan = next((n for i, n in trained.items() if i not in held), None)
    if orphan is not None or not opt.sharded:
        what = (
            f"parameter {orphan!r} of the FSDP model is not" if orphan else "the model's parameters are not"
        )
        raise ValueError(
            f"{what} in the DistributedLion optimizer: fully_shard replaces every parameter by a "
            "DTensor, so build the optimizer after fully_shard, over model.parameters(), then attach"
        )
    attachment = FsdpAttachment(model, opt)
    attachment._attach()
    opt.sharded_attached = True
    return attachment
