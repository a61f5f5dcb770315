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
from dlion.transport import Comm, make_comm
from dlion.worker.core.amp import take_loss_scale
from dlion.worker.core.checks import GradientChangedError, dense_float_grads, first_nonfinite, raise_nonfinite
from dlion.worker.core.config import CommConfig, NonFinite
from dlion.worker.core.lion import run_closure
from dlion.worker.core.saved_state import load_keeping_dtypes, own_state
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
    _step_supports_amp_scaling = True  # GradScaler steps every rank (dlion.worker.core.amp)
    _skipped: int
    _skip_flags: list[torch.Tensor]  # device flags of steps agreed on the device: skipped?

    def __init__(
        self, params: Iterable[Any], defaults: dict[str, Any], *, config: CommConfig, process_group: Any
    ) -> None:
        super().__init__(params, defaults)
        self.config = config
        self._regroup()
        self._group = process_group  # the comm is made again at the first step if it was not now
        self._comm: Comm | None = make_comm(process_group, config.timeout, config.transport)
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
    def communicates(self) -> bool:
        """Whether a step exchanges anything: a world of more than one rank."""
        return self._comm is not None and self._comm.world_size > 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        grads = dense_float_grads(type(self).__name__, [p for p, _ in self._flat], self._names)
        self._policy = "skip" if take_loss_scale(self, grads) else self.config.nonfinite
        if not self._starting.checked:
            self._resolve_comm()
        comm = self._comm if self.communicates else None
        if comm is None and self._step_alone(grads):
            self.steps_taken += 1
            return loss
        if comm is not None and not self.ledger.in_step:  # a gradient hook may have opened it
            self.ledger.begin_step()
        try:
            meta = self._agree(comm, grads)  # phases 1-2
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
        self._starting.start(comm, [p for p, _ in self._flat], self._names, self._config_text())

    def _agree(self, comm: Comm | None, grads: Grads) -> StepMeta:
        if comm is not None and not self._starting.checked:
            params, text = [p for p, _ in self._flat], self._config_text()
            self._starting.first_step(comm, params, self._names, text, grads)
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
        if self.comm_now() is None:
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
        return fp32_state(self.state, p, name)

    def _regroup(self) -> None:
        """Take the (parameter, group) pairs again, and how errors name each tensor (its name
        when the param groups carry names): after __init__ and load_state_dict."""
        self._flat = params_with_groups(self.param_groups)
        self._names = tensor_names(type(self).__name__, self.param_groups)

    def comm_now(self) -> Comm | None:
        """The transport, made now if the process group came after the optimizer was built."""
        if self._comm is None:
            self._comm = make_comm(self._group, self.config.timeout, self.config.transport)
            if self._comm is not None:
                self._params_changed()
        return self._comm

    def state_dict(self) -> dict[str, Any]:
        self.comm_now()  # the rank and world size it records are the group's
        sd = super().state_dict()
        sd[self.STATE_KEY] = {name: int(getattr(self, name)) for name in COUNTERS}
        if self.PER_RANK_STATE:  # load_state_dict refuses another rank's (saved_state.own_state)
            sd[self.STATE_KEY] |= {"world_size": self.world_size, "rank": self.rank}
        return sd

    def _restore_counters(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """This rank's own state (dlion.worker.core.saved_state), its counters set (if saved); the rest."""
        state_dict = dict(own_state(state_dict, self.STATE_KEY, self.comm_now(), type(self).__name__))
        saved = state_dict.pop(self.STATE_KEY, None)
        if saved is not None:
            for name in COUNTERS:
                setattr(self, name, int(saved[name]))
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        load_keeping_dtypes(super().load_state_dict, self, self._restore_counters(state_dict))
        self._regroup()
