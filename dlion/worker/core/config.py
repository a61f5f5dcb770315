"""Typed, validated configuration: what every communicating optimizer shares (``CommConfig``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from typing import Any, Literal, TypeVar

from dlion.aggregate.start import START_MODES
from dlion.checks import check_int, check_number, one_of
from dlion.transport import TRANSPORTS

# one_of lives in dlion.checks; the optimizers' configs import it from here too.
__all__ = [
    "NONFINITE",
    "TIES",
    "VOTES",
    "CommConfig",
    "NonFinite",
    "Start",
    "Tie",
    "Transport",
    "Vote",
    "check_lion_hyperparameters",
    "config_of",
    "one_of",
]

Vote = Literal["majority", "average"]
Tie = Literal["random", "zero"]
NonFinite = Literal["raise", "skip"]
Transport = Literal["torch", "mpi"]
Start = Literal["broadcast", "verify"]

VOTES: tuple[str, ...] = ("majority", "average")
TIES: tuple[str, ...] = ("random", "zero")
NONFINITE: tuple[str, ...] = ("raise", "skip")


def check_lion_hyperparameters(*, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
    """Raise ValueError naming the first invalid Lion hyperparameter."""
    check_number("lr", lr, low=0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check_number(f"betas[{i}]", beta, low=0, high=1, high_open=True)
    check_number("weight_decay", weight_decay, low=0)


@dataclass(frozen=True, kw_only=True)
class CommConfig:
    """What every communicating optimizer's config has; the ranks must agree on all but
    the timeout.

    transport: "torch" (torch.distributed: Gloo for CPU tensors, NCCL for CUDA) or "mpi"
               (mpi4py on NumPy buffers, COMM_WORLD; CPU tensors).
    nonfinite: what a NaN/Inf gradient on any rank does: "raise" on every rank, or "skip"
               the whole step on every rank (parameters and state untouched).
    seed:      run seed of every random draw (coins, samples); must match across ranks.
    timeout:   bound on every collective wait (None: the process group's timeout).
    start:     how ranks start from the same parameters, when the optimizer is built if the
               process group exists then, else at the first step: every rank's tensors are
               checked against rank 0's by CRC, then "broadcast" sends rank 0's where they
               differ (nothing when they are equal, as under DDP), or "verify" raises naming
               the first tensor that differs.
    """

    transport: Transport = "torch"
    nonfinite: NonFinite = "raise"
    seed: int = 0
    timeout: timedelta | None = None
    start: Start = "broadcast"

    def __post_init__(self) -> None:
        one_of("transport", self.transport, TRANSPORTS)
        one_of("nonfinite", self.nonfinite, NONFINITE)
        one_of("start", self.start, START_MODES)
        check_int("seed", self.seed, low=0)
        if self.timeout is not None and self.timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")


C = TypeVar("C", bound=CommConfig)


def config_of(cls: type[C], config: C | None, keywords: Mapping[str, Any], *, owner: str, **fixed: Any) -> C:
    """An optimizer's config: given whole (``config``), or built from its fields given as
    keywords (the constructor's keyword form), not both. ``fixed`` are fields the owner sets
    itself (e.g. from a link it was handed), so they are no keywords of its own."""
    if config is None:
        names = {f.name for f in fields(cls)} - set(fixed)
        unknown = sorted(set(keywords) - names)
        if unknown:
            raise TypeError(
                f"{owner} got unknown option(s) {', '.join(unknown)}; the options are the fields of "
                f"{cls.__name__}: {', '.join(sorted(names))}"
            )
        return cls(**keywords, **fixed)
    if keywords:
        raise TypeError(
            f"pass {owner} either config= or its fields as keywords, not both (got config and "
            f"{', '.join(sorted(keywords))})"
        )
    if not isinstance(config, cls):
        raise TypeError(f"config must be a {cls.__name__}, got {type(config).__name__}")
    return replace(config, **fixed) if fixed else config
