"""What every communicating optimizer does to stay in step with the other ranks.

DistributedLion, TernGrad and DGC share it: the config text the ranks compare at the
first step, the non-finite policy applied alike on every rank, the agreement on which
tensors have a gradient, and the step counters that key every rank's random draws and
travel in the optimizer's state_dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from dlion.aggregate.meta import StepMeta, check_fingerprint, exchange_step_meta
from dlion.compress.sign_ops import ops_for
from dlion.ledger import Ledger

COUNTERS = ("steps_taken", "skipped_steps")


class CommRanks:
    """``world_size`` and ``rank`` of an optimizer from its ``_comm`` (None: a world of one)."""

    _comm: Any

    @property
    def world_size(self) -> int:
        return int(self._comm.world_size) if self._comm is not None else 1

    @property
    def rank(self) -> int:
        return int(self._comm.rank) if self._comm is not None else 0


def params_with_groups(param_groups: Sequence[dict[str, Any]]) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Each parameter beside its param group, in order.

    torch.optim's load_state_dict replaces the group dicts, so an optimizer that keeps these
    pairs must take them again after loading, or an LR scheduler would change groups it no
    longer reads.
    """
    return [(p, g) for g in param_groups for p in g["params"]]


class NonFiniteGradientError(FloatingPointError):
    """A rank produced a NaN or Inf gradient; raised on every rank."""


def config_text(config: Any, **extra: object) -> str:
    """The config as ranks compare it: every field but the timeout, which may differ."""
    fields = asdict(config)
    fields.pop("timeout")
    fields.update(extra)
    return repr(sorted(fields.items()))


def all_finite_flag(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A device bool[1]: every element of every tensor finite (one fused max-norm over the
    list; nothing is read back)."""
    norms = torch._foreach_norm(list(tensors), float("inf"))
    return torch.isfinite(torch.stack([n.float() for n in norms])).all().reshape(1)


def first_nonfinite(grads: Sequence[torch.Tensor | None]) -> int:
    """Index of the first gradient holding a NaN or Inf, or -1 (one pass over each, by the
    Numba kernel for float32/float64 CPU tensors)."""
    on_gpu = [g for g in grads if g is not None and g.is_cuda]
    if on_gpu and bool(all_finite_flag(on_gpu)):
        # One fused max-norm over every CUDA gradient, one host read per step; the
        # tensor-by-tensor scan below runs only to name a bad one.
        grads = [None if g is not None and g.is_cuda else g for g in grads]
    return next((i for i, g in enumerate(grads) if g is not None and ops_for(g.device).nonfinite(g)), -1)


def raise_nonfinite(policy: str, *, where: str, step: int) -> None:
    """Raise under nonfinite="raise"; under "skip" return, and the caller skips the step."""
    if policy == "raise":
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) on {where} at step {step}; "
            "pass nonfinite='skip' to skip such steps on all ranks"
        )


def agree_on_step(
    comm: Any,
    *,
    check: bool,
    params: Sequence[torch.Tensor],
    text: str,
    present: np.ndarray,
    bad: int,
    ledger: Ledger,
) -> StepMeta:
    """The fingerprint exchange (when ``check``), then the step metadata; without a comm,
    this rank's own view."""
    if comm is None:
        return StepMeta(present, 0 if bad >= 0 else -1, bad)
    if check:
        check_fingerprint(comm, params, text, ledger)
    return exchange_step_meta(comm, present, bad, ledger)


def counters_state(opt: Any) -> dict[str, int]:
    return {name: int(getattr(opt, name)) for name in COUNTERS}


def restore_counters(opt: Any, state_dict: dict[str, Any], key: str) -> dict[str, Any]:
    """Set the counters from ``state_dict[key]`` (if saved); the rest of the state_dict."""
    state_dict = dict(state_dict)
    extra = state_dict.pop(key, None)
    if extra is not None:
        for name in COUNTERS:
            setattr(opt, name, int(extra[name]))
    return state_dict
