"""Arguments of the training job: one frozen config, its parser, and its argv form.

The launcher hands each worker ``TrainConfig.to_argv()``: every value explicit, with
per-optimizer defaults already resolved, so all ranks and the report agree on them.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from dlion.worker.byzantine import ATTACKS, Byzantine
from dlion.worker.config import BACKENDS, TRANSPORTS
from dlion.worker.registry import BYZANTINE, CAUTIOUS, OPTIMIZER_NAMES

# Picked by sweeps of the default job (4 workers): dlion-mavo over 1e-4..3e-3 was best at
# 3e-4..1e-3 after 200 steps and at 5e-4 after 400; adamw-global over 1e-3..1e-2 at 1e-3..3e-3.
# terngrad and dgc (momentum SGD) over 0.05, 0.15, 0.5 after 150 steps: 0.05 was best for both.
# Sign updates move every coordinate by lr, so Lion wants a smaller lr than AdamW and a
# larger weight decay to keep lr * weight_decay comparable.
_LION_LR, _ADAMW_LR, _SGD_LR = 5e-4, 2e-3, 0.05
DEFAULT_LR: dict[str, float] = {
    "lion": _LION_LR,
    "dlion-mavo": _LION_LR,
    "dlion-avg": _LION_LR,
    "signum-mavo": _LION_LR,
    "terngrad": _SGD_LR,
    "dgc": _SGD_LR,
    "lion-global": _LION_LR,
    "adamw-global": _ADAMW_LR,
}
DEFAULT_WEIGHT_DECAY: dict[str, float] = {
    "lion": 0.3,
    "dlion-mavo": 0.3,
    "dlion-avg": 0.3,
    "signum-mavo": 0.3,
    "terngrad": 1e-4,
    "dgc": 1e-4,
    "lion-global": 0.3,
    "adamw-global": 0.1,
}


# The optimizers that vote on sign bits, and so run on every backend.
VOTING_OPTIMIZERS = frozenset({"dlion-mavo", "dlion-avg", "signum-mavo"})

# The optimizers with a cautious weight decay option (sign updates: Lion and the votes).
CAUTIOUS_OPTIMIZERS = frozenset(CAUTIOUS)

# Compressed baselines that aggregate by gather: no sharded vote for them.
GATHER_BACKENDS: dict[str, tuple[str, ...]] = {
    "terngrad": ("allgather", "server"),
    "dgc": ("allgather", "server"),
}

# What to train on: the byte-level language model, or a CNN on scikit-learn's digits.
TASKS: tuple[str, ...] = ("bytes", "digits")

# Where backend="server" runs its vote: on rank 0, or in a process of its own.
SERVER_PLACEMENTS: tuple[str, ...] = ("rank0", "dedicated")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. ``out`` None means ``runs/<optimizer>-w<world size>``."""

    task: str = "bytes"
    optimizer: str = "dlion-mavo"
    steps: int = 400
    batch_size: int = 16
    context: int = 128
    lr: float = DEFAULT_LR["dlion-mavo"]
    weight_decay: float = DEFAULT_WEIGHT_DECAY["dlion-mavo"]
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    data_bytes: int = 4_000_000
    timeout_s: float = 120.0
    backend: str = "allgather"
    server: str = "rank0"
    transport: str = "torch"
    cautious_wd: bool = False
    byzantine: int = 0
    attack: str = "flip"
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    out: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.server not in SERVER_PLACEMENTS:
            raise ValueError(f"server must be one of {', '.join(SERVER_PLACEMENTS)}; got {self.server!r}")
        voting = self.optimizer in VOTING_OPTIMIZERS
        if self.server == "dedicated" and (self.backend != "server" or not voting):
            raise ValueError(
                f"server='dedicated' is a parameter-server process for the dlion optimizers with "
                f"backend='server'; got optimizer {self.optimizer!r} with backend {self.backend!r}"
            )
        allowed = GATHER_BACKENDS.get(self.optimizer, BACKENDS)
        if self.backend not in allowed:
            raise ValueError(
                f"optimizer {self.optimizer!r} runs on backend {' or '.join(allowed)}; got {self.backend!r}"
            )
        if not isinstance(self.cautious_wd, bool):
            raise ValueError(f"cautious_wd must be a bool, got {self.cautious_wd!r}")
        if self.cautious_wd and self.optimizer not in CAUTIOUS_OPTIMIZERS:
            raise ValueError(
                f"cautious weight decay is an option of {', '.join(sorted(CAUTIOUS_OPTIMIZERS))}; "
                f"got optimizer {self.optimizer!r}"
            )
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}; got {self.transport!r}")
        if self.optimizer not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZER_NAMES)}; got {self.optimizer!r}")
        for name in (
            "steps",
            "batch_size",
            "context",
            "eval_every",
            "eval_batches",
            "d_model",
            "layers",
            "heads",
        ):
            check_int(name, getattr(self, name), low=1)
        check_int("warmup_steps", self.warmup_steps, low=0)
        Byzantine(workers=self.byzantine, attack=self.attack)  # raises naming a bad value
        if self.byzantine and self.optimizer not in BYZANTINE:
            raise ValueError(
                f"byzantine workers are an option of {', '.join(BYZANTINE)}; got optimizer {self.optimizer!r}"
            )
        check_int("checkpoint_every", self.checkpoint_every, low=0)
        check_int("seed", self.seed, low=0)
        check_int("data_bytes", self.data_bytes, low=1024)
        for name in ("lr", "weight_decay", "timeout_s"):
            check_float(name, getattr(self, name), low=0.0, low_open=name != "weight_decay")
        for name in ("beta1", "beta2"):
            check_float(name, getattr(self, name), low=0.0, high=1.0)
        check_float("min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0, high_open=False)
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")

    def to_argv(self) -> list[str]:
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                argv += [f"--{f.name.replace('_', '-')}", str(value)]
        return argv

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_float(
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        lo = f"{'(' if low_open else '['}{low:g}"
        hi = f"{high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {lo}, {hi}, got {value!r}")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's flags; shared by ``python -m dlion.train`` and ``dlion train``."""
    d = TrainConfig()
    a = parser.add_argument
    a(
        "--task",
        choices=TASKS,
        default=d.task,
        help="bytes: the byte-level transformer on the Python standard library; digits: a small CNN "
        "on scikit-learn's handwritten digits (default: %(default)s)",
    )
    a("--optimizer", choices=OPTIMIZER_NAMES, default=d.optimizer, help="default: %(default)s")
    a("--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)")
    a(
        "--backend",
        choices=BACKENDS,
        default=d.backend,
        help="where the dlion vote runs: every rank on all bits, sharded, or a parameter server "
        "(default: %(default)s)",
    )
    a(
        "--server",
        choices=SERVER_PLACEMENTS,
        default=d.server,
        help="with --backend server: the server on rank 0, or a dedicated process that trains "
        "nothing (one process more than --workers) (default: %(default)s)",
    )
    a(
        "--cautious-wd",
        type=_parse_bool,
        nargs="?",
        const=True,
        default=d.cautious_wd,
        metavar="BOOL",
        help="cautious weight decay (Chen et al. 2025): decay only where the update and the "
        "parameter agree in sign; Lion and the voting optimizers (default: %(default)s)",
    )
    a(
        "--transport",
        choices=TRANSPORTS,
        default=d.transport,
        help="torch.distributed (Gloo/NCCL), or MPI through mpi4py, launched under mpiexec "
        "(default: %(default)s)",
    )
    a(
        "--byzantine",
        type=int,
        default=d.byzantine,
        metavar="K",
        help="the last K ranks attack, sending corrupted updates (default: %(default)s)",
    )
    a(
        "--attack",
        choices=ATTACKS,
        default=d.attack,
        help="what the attackers send: flip (inverted signs, negated gradients), random, or zero "
        "(default: %(default)s)",
    )
    a("--batch-size", type=int, default=d.batch_size, help="windows per rank per step (default: %(default)s)")
    a("--context", type=int, default=d.context, help="bytes per window (default: %(default)s)")
    a("--lr", type=float, default=None, help=f"peak learning rate (default per optimizer: {DEFAULT_LR})")
    a("--weight-decay", type=float, default=None, help=f"(default per optimizer: {DEFAULT_WEIGHT_DECAY})")
    a("--beta1", type=float, default=d.beta1, help="default: %(default)s")
    a("--beta2", type=float, default=d.beta2, help="default: %(default)s")
    a(
        "--warmup-steps",
        type=int,
        default=None,
        help="linear warmup before the cosine decay (default: steps // 10)",
    )
    a("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr (default: %(default)s)")
    a("--seed", type=int, default=d.seed, help="model init and batch order (default: %(default)s)")
    a("--eval-every", type=int, default=d.eval_every, help="steps between validation (default: %(default)s)")
    a(
        "--eval-batches",
        type=int,
        default=d.eval_batches,
        help="fixed validation batches (default: %(default)s)",
    )
    a("--d-model", type=int, default=d.d_model, help="default: %(default)s")
    a("--layers", type=int, default=d.layers, help="default: %(default)s")
    a("--heads", type=int, default=d.heads, help="default: %(default)s")
    a("--data-bytes", type=int, default=d.data_bytes, help="corpus size cap in bytes (default: %(default)s)")
    a(
        "--timeout-s",
        type=float,
        default=d.timeout_s,
        help="bound on every collective wait (default: %(default)s)",
    )
    a(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="steps between checkpoints; 0: only at the end (default: %(default)s)",
    )
    a(
        "--checkpoint-dir",
        default=None,
        help="a folder every rank can reach: checkpoint there, and resume from its latest "
        "checkpoint when there is one (default: no checkpoints)",
    )
    a("--out", default=None, help="report directory (default: runs/<optimizer>-w<world size>)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Resolve per-optimizer defaults; raises ValueError naming a bad value."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if values["lr"] is None:
        values["lr"] = DEFAULT_LR[args.optimizer]
    if values["weight_decay"] is None:
        values["weight_decay"] = DEFAULT_WEIGHT_DECAY[args.optimizer]
    if values["warmup_steps"] is None:
        steps = values["steps"]
        values["warmup_steps"] = steps // 10 if isinstance(steps, int) else 0
    return TrainConfig(**values)


def parse_config(argv: Sequence[str] | None = None, *, prog: str = "python -m dlion.train") -> TrainConfig:
    parser = argparse.ArgumentParser(prog=prog, description="Train a byte-level transformer with dlion.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    raise AssertionError("unreachable: parser.error exits")
