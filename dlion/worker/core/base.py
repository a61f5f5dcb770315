"""The skeleton every communicating optimizer fills: check, agree, then per bucket encode,
exchange, combine, apply.

DistributedLion, TernGrad, DGC and the fp32 all-reduce baseline are each one subclass in one
file, holding only their own math and wire format. The base owns what keeps the ranks in step:

- the transport, handed in or made once (``make_comm``), and the byte ledger;
- phase 1, check: every gradient dense floating point; the local work before agreement
  (``_local``: staging, the non-finite scan);
- the start: ranks hold rank 0's parameters before the first forward when the process group
  exists at construction (checked by CRC, sent where they differ: dlion.aggregate.start),
  else at the first step;
- phase 2, agree: on the first step a fingerprint all_gather (6 int64 per rank) of the dlion
  release, the parameter list, the config and a digest of the gradients (the same on every
  rank means they arrived averaged: every rank warns, dlion.worker.core.guard); every step the
  metadata all_gather (4 + ceil(T/8) bytes per rank) of which tensors have a gradient on
  some rank and the first non-finite one. Every rank then takes the same branch: raise
  NonFiniteGradientError naming the rank and tensor, skip the step (nonfinite="skip", or a
  GradScaler's overflow: dlion.worker.core.amp), or go on;
- phases 3 to 6, per bucket: ``_encode``, ``_exchange`` (the topology runs the combine where
  it belongs: on every rank, on a shard, at a server), ``_apply``; then ``_finish``;
- the step counters, which key every rank's random draws and travel in ``state_dict``.

A world of one (no process group, or one rank) runs the same plan with ``comm`` None and
nothing sent, unless the subclass has a rule of its own for it (``_step_alone``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import torch

from dlion.aggregate.meta import (
    StepMeta,
    exchange_step_meta,
    exchange_step_meta_on_device,
)
from dlion.ledger import Ledger
from dlion.transport import Comm
from dlion.worker.core import sharding as layout
from dlion.worker.core.amp import take_loss_scale
from dlion.worker.core.checks import GradientChangedError, dense_float_grads, first_nonfinite, raise_nonfinite
from dlion.worker.core.config import CommConfig, NonFinite
from dlion.worker.core.lion import run_closure
from dlion.worker.core.saved_state import load_keeping_dtypes, own_state
from dlion.worker.core.sharded_state import from_saved_form, to_saved_form
from dlion.worker.core.sharding import Sharding
from dlion.worker.core.starting import Starting, config_text, refuse_training_alone
from dlion.worker.core.state import fp32_state, params_with_groups, tensor_names

Grads = list[torch.Tensor | None]
COUNTERS = ("steps_taken", "skipped_steps")


class Plan(Protocol):
    """A step's work once the ranks agreed: what the buckets share."""

    n_buckets: int


W = TypeVar("W", bound=Plan)


class CommOptimizer(torch.optim.Optimizer, Generic[W]):
    """A torch.optim.Optimizer whose step() is the plan above. Subclasses fill the hooks."""

    STATE_KEY: ClassVar[str]  # where the counters travel in state_dict
    PER_RANK_STATE: ClassVar[bool] = False  # each rank's state is its own: it records the rank
    TRAINS_SHARDS: ClassVar[bool] = False  # takes FSDP2's DTensor parameters (worker/core/sharding.py)
    _step_supports_amp_scaling = True  # GradScaler steps every rank (dlion.worker.core.amp)
    _skipped: int
    _sharding: Sharding  # the parameters' layout (worker/core/sharding.py), set by _regroup
    _skip_flags: list[torch.Tensor]  # device flags of steps agreed on the device: skipped?

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], *, config: CommConfig, process_group: Any
    ) -> None:
        super().__init__(params, defaults)
        self.config = config
        self._regroup()
        self._group = process_group  # the comm is made again at the first step if it was not now
        self._comm: Comm | None = self._make_comm()
        self.ledger = Ledger(n_params=sum(p.numel() for p, _ in self._flat))
        self.steps_taken = 0  # steps that ran, skipped ones included: keys the draws
        self.skipped_steps = 0  # counted on the host, or pending as device flags (see _settle)
        self._starting = Starting(type(self).__name__, config.start, self.ledger)
        self._policy: NonFinite = config.nonfinite  # this step's: "skip" under a GradScaler
        if self._comm is not None and self._comm.world_size > 1:
            self._start(self._comm)

    @property
    def world_size(self) -> int:
        return int(self._comm.world_size) if self._comm is not None else 1

    @property
    def rank(self) -> int:
        return int(self._comm.rank) if self._comm is not None else 0

    @property
    def sharded(self) -> bool:
        """Whether the parameters are FSDP2's DTensors (worker/core/sharding.py)."""
        return self._sharding.sharded

    @property
    def communicates(self) -> bool:
        """Whether a step exchanges anything: a world of more than one rank."""
        return self._comm is not None and self._comm.world_size > 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        self.refresh_params()
        grads = dense_float_grads(type(self).__name__, [p for p, _ in self._flat], self._names)
        grads = self._sharding.locals(grads)  # a DTensor's: its local shard, after FSDP's reduce-scatter
        self._policy = (
            "skip" if take_loss_scale(self, grads, sharded=self._sharding.sharded) else self.config.nonfinite
        )
        if not self._starting.checked:
            self._resolve_comm()
        comm = self._comm if self.communicates else None
        if comm is None and (self._shards_skip(grads) or self._step_alone(grads)):
            self.steps_taken += 1
            return loss
        if comm is not None and not self.ledger.in_step:  # a gradient hook may have opened it
            self.ledger.begin_step()
        try:
            meta = self._agree(comm, grads)  # phases 1-2
            if comm is not None:  # FSDP's shard groups agree too
                meta = layout.agree_across_shards(self._shard_comm, meta, self.ledger, comm)
            if meta.changed_rank >= 0:
                self._grads_changed(meta.changed_rank, meta.changed_index)  # raises, or goes on
            if meta.bad_rank >= 0:
                self._nonfinite(meta.bad_rank, meta.bad_index)  # raises, or skips the step
            else:
                work = self._prepare(comm, grads, meta)
                for k in range(work.n_buckets):
                    packet = self._encode(work, k)  # phase 3
                    combined = self._exchange(comm, work, k, packet)  # phases 4-5
                    self._apply(work, k, combined)  # phase 6
                self._finish(work)
                self._settle(meta)  # agreed on the device: count a skip, or raise (after launching)
        finally:
            if comm is not None:
                self.ledger.end_step()
            self._after_step()
        self.steps_taken += 1
        return loss

    # ---- the hooks

    def _step_alone(self, grads: Grads) -> bool:
        """A world of one: True when the subclass took the step its own way; False runs the plan
        with nothing sent."""
        return False

    def _local(self, grads: Grads) -> int:
        """Phase 1's local work before the ranks agree; the first non-finite tensor, or -1."""
        return first_nonfinite(grads)

    def _agrees_on_device(self) -> bool:
        """Whether the agreement stays on the device; its verdict then gates every write."""
        return False

    def _local_on_device(self, grads: Grads) -> torch.Tensor:
        raise NotImplementedError  # ``_local`` with its answer on the device: int32[1], or -1

    def _first_contact(self, comm: Comm) -> None:
        """After the fingerprint, once (DistributedLion greets a dedicated server here)."""

    def _prepare(self, comm: Comm | None, grads: Grads, meta: StepMeta) -> W:
        """What the step's buckets share, now that every rank agreed to go on."""
        raise NotImplementedError

    def _encode(self, work: W, k: int) -> Any:
        raise NotImplementedError

    def _exchange(self, comm: Comm | None, work: W, k: int, packet: Any) -> Any:
        raise NotImplementedError

    def _apply(self, work: W, k: int, combined: Any) -> None:
        raise NotImplementedError

    def _finish(self, work: W) -> None:
        """After every bucket of a step that went ahead."""

    def _after_step(self) -> None:
        """After every step that agreed, skipped or not, and after one that raised."""

    def _config_extra(self) -> dict[str, object]:
        """Settings beside ``config`` that every rank must share (compared at the first step)."""
        return {}

    # ---- what the hooks share

    def _start(self, comm: Comm | None) -> None:
        self._starting.start(comm, self._tensors(), self._names, self._config_text())

    def _agree(self, comm: Comm | None, grads: Grads) -> StepMeta:
        if comm is not None and not self._starting.checked:
            params, text = self._tensors(), self._config_text()
            digested = self._sharding.digestible(grads)
            self._starting.first_step(comm, params, self._names, text, digested)
            self._first_contact(comm)
        present = np.array([g is not None for g in grads], dtype=bool)
        if comm is not None and self._agrees_on_device():
            return exchange_step_meta_on_device(comm, present, self._local_on_device(grads), self.ledger)
        bad = self._local(grads)
        if comm is None:
            return StepMeta(present, 0 if bad >= 0 else -1, bad)
        return exchange_step_meta(comm, present, bad, self.ledger)

    def _resolve_comm(self) -> None:
        """The transport, if the process group came after the optimizer (Hugging Face's
        arguments make it), or a refusal if WORLD_SIZE says several ranks and there is none."""
        if self.comm_now() is None and self._sharding.group_may_come_later:
            refuse_training_alone(type(self).__name__)

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """``module``'s buffers start equal too, with the parameters (now, if they already did)."""
        if self._starting.add_buffers(module):
            self._start(self._comm)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, as torch.optim does; its tensors join the next step, which checks the
        fingerprint and starts them equal on every rank again (every rank must add them)."""
        super().add_param_group(param_group)
        if hasattr(self, "_starting"):  # not while torch.optim's __init__ adds the first groups
            try:
                self._regroup()
            except (TypeError, ValueError):
                self.param_groups.pop()  # refused: the optimizer stays as it was
                self._regroup()
                raise
            self.ledger.n_params = sum(p.numel() for p, _ in self._flat)
            self._starting.reset()
            self._params_changed()

    def refresh_params(self) -> bool:
        """Take the param groups' tensors again if a framework replaced them after the optimizer
        was built (Accelerate's FSDP2 ``prepare`` puts the model's DTensors in place of the
        tensors it was built on): the layout, the transport and the plan follow, and the next
        step starts the ranks equal again. True if they had changed. Called by every step()."""
        now = [p for g in self.param_groups for p in g["params"]]
        if len(now) == len(self._flat) and all(p is q for p, (q, _) in zip(now, self._flat, strict=True)):
            return False
        if self.state:
            raise ValueError(
                f"{type(self).__name__}: its param groups hold other tensors than the ones it has state "
                "for (replaced, or appended without add_param_group): use add_param_group, or build "
                "a new optimizer"
            )
        was = self._sharding
        del self._sharding  # the new tensors may be laid out otherwise (plain -> DTensor)
        try:
            self._regroup()
        except (TypeError, ValueError):
            self._sharding = was
            raise
        self._comm = self._make_comm()
        self.ledger.n_params = sum(p.numel() for p, _ in self._flat)
        self._starting.reset()
        self._params_changed()
        return True

    def _params_changed(self) -> None:
        """The parameter list or the world changed after __init__: plan again what depends on it."""

    def _nonfinite(self, rank: int, index: int) -> None:
        """Raise NonFiniteGradientError, or count the step as skipped: the same on every rank."""
        raise_nonfinite(self._policy, where=f"rank {rank}, {self._names[index]}", step=self.steps_taken)
        self.skipped_steps += 1

    def _grads_changed(self, rank: int, index: int) -> None:
        """Some rank's gradient changed after its exchange began during backward: raise on every
        rank (DistributedLion learns from it on its first step instead)."""
        raise GradientChangedError(rank, self._names[index], self.steps_taken)

    def _settle(self, meta: StepMeta) -> None:
        """After a step agreed on the device (the gated kernels wrote nothing if it failed):
        under "raise" read the verdict back, after every launch, and raise on every rank; under
        "skip" keep the flag, counted when ``skipped_steps`` is read (a changed gradient too:
        its own rank raised in _prepare)."""
        if meta.go is not None and self._policy == "skip":
            self._skip_flags.append(~meta.go)
        elif meta.go is not None and (seen := meta.settle()).changed_rank >= 0:
            self._grads_changed(seen.changed_rank, seen.changed_index)
        elif meta.go is not None and seen.bad_rank >= 0:
            self._nonfinite(seen.bad_rank, seen.bad_index)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient (reading it reads any device flags)."""
        self._skipped += int(torch.cat(self._skip_flags).sum()) if self._skip_flags else 0
        self._skip_flags = []
        return self._skipped

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped, self._skip_flags = int(value), []

    def _config_text(self) -> str:
        """The config as ranks compare it: every field but the timeout, which may differ."""
        return config_text(self.config, self._config_extra())

    def _fp32_state(self, p: torch.Tensor, name: str) -> torch.Tensor:
        """state[p][name], of the shape of p's local shard (p itself, unless sharded)."""
        return fp32_state(self.state, p, name, like=self._sharding.local(p))

    def _tensors(self) -> list[torch.Tensor]:
        """What this rank holds of each parameter, in order: the local shards of DTensors."""
        return self._sharding.locals([p for p, _ in self._flat])

    def _regroup(self) -> None:
        """Take the (parameter, group) pairs again, how errors name each tensor (its name when
        the param groups carry names) and how the parameters are laid out: after __init__,
        add_param_group and load_state_dict."""
        self._flat = params_with_groups(self.param_groups)
        self._names = tensor_names(type(self).__name__, self.param_groups)
        sharding = layout.sharding_of(type(self).__name__, [p for p, _ in self._flat], self._names)
        if sharding.sharded and not self.TRAINS_SHARDS:
            raise ValueError(
                f"{type(self).__name__} does not train FSDP-sharded (DTensor) parameters: under "
                "FSDP2 use dlion.DistributedLion (with dlion.attach), or a torch.optim optimizer"
            )
        if getattr(self, "_sharding", sharding) != sharding:
            raise ValueError(
                f"{type(self).__name__}: the new parameters are laid out {sharding.placements} on "
                f"{sharding.mesh}, the others {self._sharding.placements} on {self._sharding.mesh}"
            )
        self._sharding = sharding
        if sharding.sharded:  # the key a checkpoint's param groups carry the counters in, live too:
            for g in self.param_groups:  # DCP's flattened form loads only the live groups' keys
                g.setdefault(self.STATE_KEY, {})

    def _shards_skip(self, grads: Grads) -> bool:
        """Sharded on a 1-D mesh (nothing voted): whether a non-finite gradient in any shard
        skips the step on every rank (or raises on every rank), agreed before a shard moves."""
        if self._shard_comm is None:
            return False
        rank, index = layout.verdict_of_shards(self._shard_comm, grads, self.ledger)
        if rank >= 0:
            self._nonfinite(rank, index)
        return rank >= 0

    def _make_comm(self) -> Comm | None:
        """The transport the ranks vote over, and FSDP's shard group's (sharding.comms_of)."""
        cfg, who = self.config, type(self).__name__
        comm, shards = layout.comms_of(self._sharding, self._group, cfg.transport, cfg.timeout, who)
        self._shard_comm: Comm | None = shards  # where FSDP's shard groups agree on the step
        return comm

    def comm_now(self) -> Comm | None:
        """The transport, made now if the process group came after the optimizer was built."""
        if self._comm is None and self._sharding.group_may_come_later:
            self._comm = self._make_comm()
            if self._comm is not None:
                self._params_changed()
        return self._comm

    def state_dict(self) -> dict[str, Any]:
        self.refresh_params()  # a framework may have swapped the tensors since the last step
        self.comm_now()  # the rank and world size it records are the group's
        sd = super().state_dict()
        counters = {name: int(getattr(self, name)) for name in COUNTERS}
        if self._sharding.sharded:  # for DCP, which keeps only "state" and "param_groups"
            params = [p for p, _ in self._flat]
            return to_saved_form(sd, self._sharding, params, self.STATE_KEY, counters)
        sd[self.STATE_KEY] = counters
        if self.PER_RANK_STATE:  # load_state_dict refuses another rank's (saved_state.own_state)
            sd[self.STATE_KEY] |= {"world_size": self.world_size, "rank": self.rank}
        return sd

    def _restore_counters(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """This rank's own state (dlion.worker.core.saved_state), its counters set (if saved); the rest."""
        if self._sharding.sharded:
            params, who = [p for p, _ in self._flat], type(self).__name__
            state_dict = from_saved_form(state_dict, self._sharding, params, self.STATE_KEY, who)
        else:
            state_dict = dict(own_state(state_dict, self.STATE_KEY, self.comm_now(), type(self).__name__))
        saved = state_dict.pop(self.STATE_KEY, None)
        if saved is not None:
            for name in COUNTERS:
                setattr(self, name, int(saved[name]))
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.refresh_params()
        load_keeping_dtypes(super().load_state_dict, self, self._restore_counters(state_dict))
        self._regroup()
