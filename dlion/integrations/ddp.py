"""``dlion.attach``: Distributed Lion inside DistributedDataParallel, as a communication hook.

DDP all-reduces fp32 gradients, bucket by bucket, as backward produces them; with
DistributedLion as the optimizer that spends 4 bytes per parameter per step for nothing (every
rank then votes on the same averaged gradient). ``attach(ddp_model, optimizer)`` registers a
DDP communication hook that replaces the all-reduce:

1. DDP calls the hook once per DDP bucket, in bucket order on every rank, when the bucket's
   gradients are final. The hook sends nothing and hands DDP back the bucket unchanged, so
   each ``p.grad`` stays this rank's own gradient.
2. It tells the optimizer which parameters are final. Every DistributedLion bucket they
   complete starts its sign step, exchange and vote at once (``vote_bucket``), in one fixed
   order on every rank, so the collectives pair up across ranks whatever the timing; its new
   momentum waits (dlion.worker.lion.overlap). DDP's buckets can differ from DistributedLion's
   and be rebuilt after the first iteration: the optimizer tracks parameters, not buckets.
3. ``optimizer.step()`` agrees on the step (NaN, absent gradients), launches what backward did
   not, and applies the votes; a skipped step drops the waiting momentum.

Results equal DistributedLion's without DDP, bit for bit. The first step runs whole in
step(), which checks the fingerprint first. With backend "server" (or MPI, or nothing to
send) the hook only silences DDP and the vote runs in step(). Gradient accumulation goes
under ``model.no_sync()``, where DDP calls no hook. ``detach()`` (or ``optimizer.close()``)
gives DDP back its default all-reduce.

What the loop does between backward and step() (``clip_grad_norm_``, ``GradScaler``) must
reach the vote, so it cannot start in backward then. ``vote_in_step``: True runs every vote
in step() (the hook only silences DDP; bytes are the same, backward is not overlapped); False
starts votes in backward, and a gradient changed after its vote began raises
GradientChangedError on every rank; None (default) learns it at the first step, which runs in
step() anyway: if any rank's gradients changed between backward and step(), every vote runs
in step(), else in backward. Either way the result equals plain DistributedLion's with the
same loop, bit for bit. DDP's own start broadcast is trusted: the optimizer checks the ranks'
parameters by CRC and sends nothing when they are equal.

A local-steps optimizer (dlion-local, diloco: dlion.worker.local) takes the same hook, which
then only silences DDP: each rank's inner steps train on its own gradient, and the round's
outer step runs in step() at its end, as without DDP, bit for bit.

At world size 1 (or without a process group) there is nothing to replace: ``attach`` returns
a handle that does nothing, as the framework callbacks do, and training goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel as DDP

from dlion.integrations.fsdp import FsdpAttachment, attach_fsdp, holds_fsdp
from dlion.worker.core.state import unwrapped
from dlion.worker.lion.distributed_lion import DistributedLion
from dlion.worker.local.optimizer import LocalSteps


@dataclass
class HookState:
    """What the hook holds: what to tell the optimizer of a bucket's final parameters
    (DistributedLion starts their votes; a local-steps optimizer needs nothing)."""

    ready: Callable[[list[torch.Tensor]], None]
    process_group: dist.ProcessGroup | None  # DDP's, for its default all-reduce after detach
    attached: bool = True

    def detach(self) -> None:
        self.attached = False


def dlion_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook: no all-reduce; the bucket's parameters are final."""
    if not state.attached:
        return allreduce_hook(state.process_group, bucket)  # type: ignore[arg-type]
    state.ready(bucket.parameters())
    done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


# DDP checks the hook's annotations as objects; this module's are strings (postponed).
dlion_hook.__annotations__ = {
    "state": HookState,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


class Attachment:
    """The handle ``attach`` returns: ``detach()`` restores DDP's all-reduce. At world size 1
    it holds no DDP module and does nothing."""

    def __init__(
        self, ddp: DDP | None, optimizer: DistributedLion | LocalSteps, state: HookState | None
    ) -> None:
        self.ddp, self.optimizer, self.state = ddp, optimizer, state

    @property
    def attached(self) -> bool:
        return self.state is not None and self.state.attached

    @property
    def vote_in_step(self) -> bool | None:
        """Whether votes run in step() (None: the first step has not decided yet). A local-steps
        optimizer's always do, at a round's end."""
        if isinstance(self.optimizer, LocalSteps):
            return True if self.attached else None
        return self.optimizer.launching.vote_in_step if self.attached else None

    def detach(self) -> None:
        if self.state is not None:
            self.state.detach()
            if isinstance(self.optimizer, DistributedLion):
                self.optimizer.launching.stop()


def find_ddp(model: torch.nn.Module) -> DDP:
    """``model`` if it is a DDP module, else the first DDP module it holds."""
    if isinstance(model, DDP):
        return model
    found = None
    if isinstance(model, torch.nn.Module):
        found = next((m for m in model.modules() if isinstance(m, DDP)), None)
    if found is None:
        raise ValueError(
            f"dlion.attach needs a DistributedDataParallel or FSDP2 (fully_shard) model, or a module "
            f"holding one, got {type(model).__name__} (under FSDP, attach after fully_shard); without "
            "DDP or FSDP, DistributedLion needs no hook"
        )
    return found


def unwrap_optimizer(optimizer: Any) -> DistributedLion | LocalSteps:
    """The DistributedLion (or local-steps optimizer) inside a framework's wrapper (Accelerate's,
    Lightning's)."""
    needs = "dlion.attach needs a dlion.DistributedLion optimizer, or a local-steps one (dlion-local, diloco)"
    found: DistributedLion | LocalSteps = unwrapped(optimizer, (DistributedLion, LocalSteps), needs)
    return found


def end_rounds(optimizer: Any) -> None:
    """A local-steps optimizer (inside a framework's wrapper or not) ends its partial round, so
    every rank holds the same model at the end of training; any other optimizer: nothing. A
    collective for a local-steps optimizer: every rank calls it."""
    try:
        opt = unwrapped(optimizer, LocalSteps, "")
    except ValueError:
        return
    opt.sync()


def attach(
    model: torch.nn.Module, optimizer: Any, *, vote_in_step: bool | None = None
) -> Attachment | FsdpAttachment:
    """Replace DDP's gradient all-reduce with DistributedLion's vote (see the module doc).

    ``model``: a DistributedDataParallel module, or one that holds one (Accelerate's and
    Lightning's wrapped models are DDP); or an FSDP2 model (``fully_shard``, on a 1-D or a 2-D
    (replicate, shard) mesh: dlion.integrations.fsdp, where votes run in step()).
    ``optimizer``: a DistributedLion over the model's parameters, or a framework's wrapper of
    one. ``vote_in_step``: where votes run (module doc); pass True when the loop clips or
    unscales gradients between backward and step().
    Call before the first backward.
    """
    if holds_fsdp(model):
        return attach_fsdp(model, optimizer)  # FSDP2: the replicas vote (dlion.integrations.fsdp)
    opt = unwrap_optimizer(optimizer)
    if vote_in_step not in (None, True, False):
        raise ValueError(f"vote_in_step must be None, True or False, got {vote_in_step!r}")
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return Attachment(None, opt, None)  # one process: no all-reduce to replace
    ddp = find_ddp(model)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    orphan = next(
        (n for n, p in ddp.module.named_parameters() if p.requires_grad and id(p) not in held), None
    )
    if orphan is not None:
        raise ValueError(
            f"parameter {orphan!r} of the DDP model is not in the DistributedLion optimizer: with the "
            "hook DDP no longer averages its gradient; give the optimizer every trained parameter"
        )
    group = ddp.process_group
    if opt.world_size != dist.get_world_size(group):
        raise ValueError(
            f"the optimizer's group has {opt.world_size} ranks, DDP's has {dist.get_world_size(group)}: "
            "build DistributedLion over the same process group as DDP"
        )
    if isinstance(opt, LocalSteps):  # each rank keeps its own gradient; rounds end in step()
        state = HookState(lambda params: None, group)
    else:
        state = HookState(opt.launching.ready, group)
        opt.launching.attach_ddp(on_stop=state.detach, vote_in_step=vote_in_step)
    ddp.register_comm_hook(state, dlion_hook)
    return Attachment(ddp, opt, state)
