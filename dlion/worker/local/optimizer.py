"""Local steps: H steps of each rank's own optimizer, then one outer step on the ranks'
pseudo-gradients, every rank starting the next round from the same parameters."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from dlion.ledger import Ledger
from dlion.transport import Comm
from dlion.worker.core.base import CommOptimizer
from dlion.worker.core.checks import NonFiniteGradientError, first_nonfinite
from dlion.worker.core.lion import run_closure
from dlion.worker.core.saved_state import load_keeping_dtypes, own_state
from dlion.worker.local.config import LocalStepsConfig
from dlion.worker.local.pseudo import pseudo_gradient, sign_residual

STATE_KEY = "local"
NO_SCALER = (
    "LocalSteps does not take a GradScaler: each rank checks its own gradients for overflow during "
    "the inner steps, so ranks would skip different steps and their rounds would part; train in "
    "bfloat16 autocast (no scaler), or fp32"
)


class LocalSteps(torch.optim.Optimizer):
    """H inner steps on every rank alone, then an outer step on the pseudo-gradients.

    ``inner`` (a torch optimizer: dlion.Lion, AdamW) and ``outer`` (a CommOptimizer: a
    DistributedLion, whose vote is dlion-local's; an fp32 all-reduce baseline over Nesterov
    SGD, DiLoCo's) hold the same tensors in the same groups. Per step t (from 0), N ranks:

      1. Inner: this rank's optimizer steps on its own gradient; nothing is sent. A gradient
         with a NaN/Inf is not applied, and the rank marks its round as poisoned.
      At the round's end ((t + 1) % H == 0, or ``sync()``):
      2. Pseudo-gradient: q_i = anchor - p_i, plus this rank's residual under error feedback
         (dlion.worker.local.pseudo); a poisoned round's q_i carries a NaN.
      3. Outer step: every parameter goes back to the anchor, q_i stands in as its gradient,
         and the outer optimizer runs its own plan with lr = ``outer_lr`` (times the inner lr
         under ``outer_lr_unit="inner_lr"``): DistributedLion signs, votes and applies
         anchor*(1 - lr wd) - lr vote; the baseline all-reduces the mean and steps. A NaN on
         any rank raises on every rank naming it, or (nonfinite="skip") skips the round on
         every rank: the parameters stay the anchor.
      4. Error feedback: q_i - mean|q_i| sign(q_i) is kept for the next round.
      5. The anchor becomes the parameters, identical on every rank.

    ``ledger`` is the outer optimizer's, with one step per inner step (empty inside a round), so
    its bits per parameter per step count the whole run. ``consensus()`` shows the anchor (the
    model every rank agrees on) for an evaluation in the middle of a round. At the end of
    training call ``sync()``: a partial round ends there, so no rank keeps parameters of its own.
    """

    _step_supports_amp_scaling = True  # a GradScaler hands its scale here, to be refused

    def __init__(
        self, inner: torch.optim.Optimizer, outer: CommOptimizer[Any], config: LocalStepsConfig
    ) -> None:
        mine = [p for g in inner.param_groups for p in g["params"]]
        theirs = [p for g in outer.param_groups for p in g["params"]]
        if (
            len(inner.param_groups) != len(outer.param_groups)
            or any(p is not q for p, q in zip(mine, theirs, strict=False))
            or len(mine) != len(theirs)
        ):
            raise ValueError(
                "LocalSteps: the inner and outer optimizers must hold the same tensors in the same groups"
            )
        if getattr(outer.config, "overlap", False):
            raise ValueError(
                "LocalSteps: the outer DistributedLion must not overlap (overlap=True): its vote takes "
                "the round's pseudo-gradients in step(), not the gradients of a backward"
            )
        if outer.sharded:
            raise ValueError(
                "LocalSteps does not train FSDP-sharded (DTensor) parameters; use DistributedLion"
            )
        super().__init__(inner.param_groups, inner.defaults)
        self.inner, self.outer, self.config = inner, outer, config
        self.param_groups, self.state = inner.param_groups, inner.state
        for g in self.param_groups:
            g.setdefault("outer_lr", config.outer_lr)
        self._params = mine
        self.steps_taken = 0  # inner steps, every rank's the same
        self.round_start = 0  # the inner step the current round began at
        self._poisoned = -1  # the first tensor of this round whose gradient was non-finite here
        self._touched = [False] * len(mine)  # had a gradient here this round: else no vote from here
        self._anchor: list[torch.Tensor] | None = None  # taken at the first step, after the start
        self._residual: list[torch.Tensor] | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "outer"):  # torch.optim's __init__ adds the first groups through here
            raise ValueError(
                "LocalSteps does not take new param groups after it is built: build it again with them"
            )
        super().add_param_group(param_group)

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """``module``'s buffers start equal on every rank, as the parameters do."""
        self.outer.sync_buffers(module)

    # ---- what the helpers and frameworks read (dlion.worker.core.saved_state.Saves)

    @property
    def ledger(self) -> Ledger:
        return self.outer.ledger

    @property
    def sharded(self) -> bool:
        return False

    @property
    def world_size(self) -> int:
        return self.outer.world_size

    @property
    def rank(self) -> int:
        return self.outer.rank

    @property
    def rounds(self) -> int:
        """Outer steps taken, skipped ones included."""
        return self.outer.steps_taken

    def comm_now(self) -> Comm | None:
        return self.outer.comm_now()

    # ---- the plan

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        if hasattr(self, "found_inf"):
            raise ValueError(NO_SCALER)
        loss = run_closure(closure)
        if self._anchor is None:  # the outer optimizer's start made the ranks equal by now
            self._anchor = [p.detach().clone() for p in self._params]
        bad = first_nonfinite([p.grad for p in self._params])
        if bad < 0:
            self.inner.step()  # phase 1
            self._touched = [
                t or p.grad is not None for t, p in zip(self._touched, self._params, strict=True)
            ]
        elif self._poisoned < 0:
            self._poisoned = bad
        self.steps_taken += 1
        if self.steps_taken - self.round_start >= self.config.local_steps:
            self._end_round()
        elif self._counts():
            self.ledger.begin_step()  # an inner step: nothing sent, but a step of the run
            self.ledger.end_step()
        return loss

    @torch.no_grad()
    def sync(self) -> None:
        """End the current round now, if it has begun: after it every rank holds the same
        parameters. A collective: every rank calls it at the same step."""
        if self.steps_taken > self.round_start:
            self._end_round(reopen=True)

    def _counts(self) -> bool:
        return self.outer.comm_now() is not None and self.outer.communicates

    def _end_round(self, *, reopen: bool = False) -> None:
        assert self._anchor is not None
        grads, touched = [p.grad for p in self._params], self._touched
        sent = [
            pseudo_gradient(a, p, self._residual_of(i))
            for i, (a, p) in enumerate(zip(self._anchor, self._params, strict=True))
        ]  # phase 2
        if self._poisoned >= 0:
            sent[self._poisoned].view(-1)[:1] = float("nan")
        for i, (p, a, q) in enumerate(zip(self._params, self._anchor, sent, strict=True)):
            p.copy_(a)  # no vote from a rank that had no gradient for it all round
            # A copy: an all-reduce outer step writes its mean into p.grad, and q stays this rank's.
            p.grad = q.to(p.dtype, copy=True) if self._touched[i] or i == self._poisoned else None
        self._set_outer_lr()
        skipped = self.outer.skipped_steps
        if self._counts():  # the outer step records into this inner step (sync: the last one,
            # unless none is on record: a sync right after a load, whose ledger is the caller's)
            self.ledger.reopen_step() if reopen and self.ledger.last_step_silent else self.ledger.begin_step()
        try:
            self.outer.step()  # phase 3
        except NonFiniteGradientError as e:
            raise NonFiniteGradientError(
                f"{e} (round {self.rounds} of {self.config.local_steps} local steps: a gradient was "
                "non-finite during the round's inner steps, or they drove a parameter to NaN)"
            ) from None
        finally:
            for p, g in zip(self._params, grads, strict=True):
                p.grad = g
            self.round_start, self._poisoned = self.steps_taken, -1
            self._touched = [False] * len(self._params)
        if self.config.error_feedback and self.outer.skipped_steps == skipped:
            # phase 4; a tensor this rank sent nothing for keeps all of q (its old residual)
            self._residual = [sign_residual(q) if t else q for q, t in zip(sent, touched, strict=True)]
        for a, p in zip(self._anchor, self._params, strict=True):
            a.copy_(p)  # phase 5

    def _residual_of(self, i: int) -> torch.Tensor | None:
        if not self.config.error_feedback or self._residual is None:
            return None
        return self._residual[i]

    def _set_outer_lr(self) -> None:
        for mine, theirs in zip(self.param_groups, self.outer.param_groups, strict=True):
            scale = mine["lr"] if self.config.outer_lr_unit == "inner_lr" else 1.0
            theirs["lr"] = mine["outer_lr"] * scale

    @contextmanager
    def consensus(self) -> Iterator[None]:
        """The anchor in the parameters while inside (an evaluation in the middle of a round),
        this rank's own parameters back after."""
        if self._anchor is None or self.steps_taken == self.round_start:
            yield
            return
        own = [p.detach().clone() for p in self._params]
        with torch.no_grad():
            for p, a in zip(self._params, self._anchor, strict=True):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(self._params, own, strict=True):
                    p.copy_(o)

    # ---- saved state: this rank's own (its parameters in the middle of a round included)

    def state_dict(self) -> dict[str, Any]:
        outer = self.outer
        counters = {
            "steps_taken": self.steps_taken,
            "round_start": self.round_start,
            "poisoned": self._poisoned,
            "touched": list(self._touched),
        }
        return {
            STATE_KEY: counters | {"rank": outer.rank, "world_size": outer.world_size},
            "inner": self.inner.state_dict(),
            "outer": outer.state_dict(),
            "anchor": None if self._anchor is None else [a.clone() for a in self._anchor],
            "residual": None if self._residual is None else [e.clone() for e in self._residual],
            "params": [p.detach().clone() for p in self._params],
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = own_state(state_dict, STATE_KEY, self.comm_now(), type(self).__name__)
        saved = state["params"]
        if len(saved) != len(self._params) or any(
            s.shape != p.shape for s, p in zip(saved, self._params, strict=False)
        ):
            raise ValueError("LocalSteps.load_state_dict: the saved parameters do not match this optimizer's")
        load_keeping_dtypes(self.inner.load_state_dict, self.inner, state["inner"])  # fp32 momentum stays
        self.outer.load_state_dict(state["outer"])
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
        counters = state[STATE_KEY]
        self.steps_taken, self.round_start = int(counters["steps_taken"]), int(counters["round_start"])
        self._poisoned = int(counters["poisoned"])
        self._touched = [bool(t) for t in counters["touched"]]
        device = self._params[0].device if self._params else torch.device("cpu")
        self._anchor = None if state["anchor"] is None else [a.to(device) for a in state["anchor"]]
        self._residual = None if state["residual"] is None else [e.to(device) for e in state["residual"]]
        for p, s in zip(self._params, saved, strict=True):
            p.copy_(s)
