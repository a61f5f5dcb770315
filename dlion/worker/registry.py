"""Optimizers by name, for the training job and the benchmarks.

A table of builders, not an if/elif chain: adding a baseline is adding a row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dlion.ledger import Ledger
from dlion.server import ServerLink
from dlion.worker.byzantine import Byzantine
from dlion.worker.config import Vote
from dlion.worker.dgc import build_dgc
from dlion.worker.distributed_lion import DistributedLion
from dlion.worker.global_opt import GlobalOptimizer
from dlion.worker.lion import Lion
from dlion.worker.terngrad import build_terngrad


@dataclass(frozen=True, kw_only=True)
class BuildArgs:
    """What every builder receives besides the parameters."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    process_group: dist.ProcessGroup | None = None
    seed: int = 0
    backend: str = "allgather"  # where the dlion vote runs; dense baselines all-reduce
    transport: str = "torch"  # torch.distributed or mpi (mpi4py)
    server: ServerLink | None = None  # a dedicated parameter server, for backend="server"
    cautious_wd: bool = False  # Lion and the voting optimizers only
    byzantine: Byzantine | None = None  # attacking ranks: the voters and the all-reduce baselines
    timeout: timedelta | None = None  # bound on every collective wait (None: the process group's)


Builder = Callable[[Iterable[Any], BuildArgs], Any]


class LocalOptimizer:
    """A single-process optimizer with an (empty) ledger, so reports look the same."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner
        self.ledger = Ledger(n_params=sum(p.numel() for g in inner.param_groups for p in g["params"]))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        return self.inner.step(closure)


def _lion(params: Iterable[Any], a: BuildArgs) -> Any:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(a.process_group) > 1:
        raise ValueError(
            "optimizer 'lion' is single-process; use 'lion-global' or 'dlion-mavo' with N workers"
        )
    lion = Lion(params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay, cautious_wd=a.cautious_wd)
    return LocalOptimizer(lion)


def _dlion(vote: Vote) -> Builder:
    def build(params: Iterable[Any], a: BuildArgs) -> Any:
        return DistributedLion(
            params,
            lr=a.lr,
            betas=a.betas,
            weight_decay=a.weight_decay,
            vote=vote,
            process_group=a.process_group,
            seed=a.seed,
            backend=a.backend,
            transport=a.transport,
            server=a.server,
            cautious_wd=a.cautious_wd,
            byzantine=a.byzantine,
            timeout=a.timeout,
        )

    return build


def _signum(params: Iterable[Any], a: BuildArgs) -> Any:
    """Signum with majority vote (Bernstein et al., ICLR 2019, Algorithm 1).

    Each worker keeps v <- b*v + (1-b)*g and sends sign(v); the server votes and every
    worker applies x <- x - lr*(sign(sum of signs) + wd*x). That is Distributed Lion with
    beta1 = beta2 = b: Lion's sent direction b1*m + (1-b1)*g is then Signum's new v, so the
    same kernels, backends and ledger serve it (b = betas[0]).
    """
    b = a.betas[0]
    return _dlion("majority")(params, replace(a, betas=(b, b)))


def _gathering(build: Callable[..., Any], name: str) -> Builder:
    """TernGrad and DGC: gather-based baselines with their server on rank 0 only."""

    def make(params: Iterable[Any], a: BuildArgs) -> Any:
        if a.server is not None:
            raise ValueError(f"{name} runs its server on rank 0; a dedicated server process is for dlion")
        return build(
            params,
            lr=a.lr,
            weight_decay=a.weight_decay,
            betas=a.betas,
            process_group=a.process_group,
            seed=a.seed,
            backend=a.backend,
            transport=a.transport,
            timeout=a.timeout,
        )

    return make


def _global(make_inner: Callable[..., torch.optim.Optimizer]) -> Builder:
    def build(params: Iterable[Any], a: BuildArgs) -> Any:
        inner = make_inner(params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay)
        return GlobalOptimizer(
            inner,
            a.process_group,
            transport=a.transport,
            byzantine=a.byzantine,
            seed=a.seed,
            timeout=a.timeout,
        )

    return build


OPTIMIZERS: dict[str, Builder] = {
    "lion": _lion,
    "dlion-mavo": _dlion("majority"),
    "dlion-avg": _dlion("average"),
    "signum-mavo": _signum,
    "terngrad": _gathering(build_terngrad, "terngrad"),
    "dgc": _gathering(build_dgc, "dgc"),
    "adamw-global": _global(torch.optim.AdamW),
    "lion-global": _global(Lion),
}
OPTIMIZER_NAMES: tuple[str, ...] = tuple(OPTIMIZERS)
CAUTIOUS: tuple[str, ...] = ("lion", "dlion-mavo", "dlion-avg", "signum-mavo")
# Where an attacker's corruption is defined: sign bits of a vote, or an all-reduced gradient.
BYZANTINE: tuple[str, ...] = ("dlion-mavo", "dlion-avg", "signum-mavo", "adamw-global", "lion-global")
DEFAULT_BETAS: dict[str, tuple[float, float]] = {"adamw-global": (0.9, 0.999)}


def build_optimizer(
    name: str,
    params: Iterable[Any],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] | None = None,
    process_group: dist.ProcessGroup | None = None,
    seed: int = 0,
    backend: str = "allgather",
    transport: str = "torch",
    server: ServerLink | None = None,
    cautious_wd: bool = False,
    byzantine: Byzantine | None = None,
    timeout: timedelta | None = None,
) -> Any:
    """The optimizer called ``name``; every one has ``.ledger``.

    ``betas=None`` takes each optimizer's own default: (0.9, 0.99) for the Lion family,
    (0.9, 0.999) for AdamW.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    if betas is None:
        betas = DEFAULT_BETAS.get(name, (0.9, 0.99))
    args = BuildArgs(
        lr=lr,
        weight_decay=weight_decay,
        betas=betas,
        process_group=process_group,
        seed=seed,
        backend=backend,
        transport=transport,
        server=server,
        cautious_wd=cautious_wd,
        byzantine=byzantine,
        timeout=timeout,
    )
    if byzantine is not None and byzantine.workers > 0 and name not in BYZANTINE:
        raise ValueError(f"byzantine workers are an option of {', '.join(BYZANTINE)}; got optimizer {name!r}")
    if cautious_wd and name not in CAUTIOUS:
        raise ValueError(f"cautious_wd is an option of {', '.join(CAUTIOUS)}; got optimizer {name!r}")
    return OPTIMIZERS[name](params, args)
