"""Typed, validated configuration: what every communicating optimizer shares (``CommConfig``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from dlion.aggregate.start import START_MODES
from dlion.transport import TRANSPORTS

Vote = Literal["majority", "average"]
Tie = Literal["random", "zero"]
NonFinite = Literal["raise", "skip"]
Transport = Literal["torch", "mpi"]
Start = Literal["broadcast", "verify"]

VOTES: tuple[str, ...] = ("majority", "average")
TIES: tuple[str, ...] = ("random", "zero")
NONFINITE: tuple[str, ...] = ("raise", "skip")


def _finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_lion_hyperparameters(*, lr: float, betas: tuple[float, float], weight_decay: float) -> None:
    """Raise ValueError naming the first invalid Lion hyperparameter."""
    if _finite_number("lr", lr) < 0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= _finite_number(f"betas[{i}]", beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
    if _finite_number("weight_decay", weight_decay) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def one_of(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.timeout is not None and self.timeout.total_seconds() <= 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")
