"""The one catalogue of optimizers: a row each, and what the job, the CLI, the launchers and
the benchmarks ask about them.

A row holds its builder, its defaults (lr and weight decay of the training job, betas of the
library) and what it supports: backends, cautious weight decay, byzantine workers, whether
it runs on one process only. Adding a baseline is adding a row; nothing else lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dlion.server import ServerLink
from dlion.transport import TorchComm
from dlion.worker.baselines.dgc import build_dgc
from dlion.worker.baselines.global_opt import GlobalOptimizer
from dlion.worker.baselines.powersgd import PowerSGD, PowerSGDConfig
from dlion.worker.baselines.terngrad import build_terngrad
from dlion.worker.core.byzantine import Byzantine
from dlion.worker.core.lion import Lion
from dlion.worker.lion.distributed_lion import DistributedLion


@dataclass(frozen=True, kw_only=True)
class BuildArgs:
    """What every builder receives besides the parameters."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    cautious_wd: bool = False  # rows with ``cautious`` only
    seed: int = 0
    process_group: Any = None  # a torch ProcessGroup, an mpi4py communicator, or a dlion Comm
    backend: str = "allgather"  # where a vote or a gather runs; see each row's ``backends``
    transport: str = "torch"  # torch.distributed or mpi (mpi4py)
    server: ServerLink | None = None  # a dedicated parameter server (rows with ``votes``)
    byzantine: Byzantine | None = None  # attacking ranks (rows with ``byzantine``)
    timeout: timedelta | None = None  # bound on every collective wait (None: the process group's)
    start: str = "broadcast"  # ranks start equal: "broadcast" rank 0's parameters, or "verify"
    procs_per_node: int | None = None  # backend "hierarchical": ranks per node (None: LOCAL_WORLD_SIZE)
    powersgd_rank: int = 4  # rows with ``ddp``: PowerSGD's approximation rank
    powersgd_start: int = 10  # rows with ``ddp``: steps of uncompressed all-reduce first


Builder = Callable[[Iterable[Any], BuildArgs], torch.optim.Optimizer]


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One optimizer. ``backends`` empty: it has no aggregation to place (a dense all-reduce,
    or one process), and any backend setting is accepted and ignored."""

    name: str
    summary: str
    build: Builder
    lr: float  # the training job's default, from sweeps of the default job
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.99)  # the job's default, and build_optimizer's
    backends: tuple[str, ...] = ()  # the first is the training job's default
    votes: bool = False  # sends sign bits to a vote: a dedicated server process can serve it
    cautious: bool = False
    byzantine: bool = False
    single_process: bool = False
    ddp: bool = False  # communicates inside DDP's backward: train through ``opt.wrap(model)``

    @property
    def default_backend(self) -> str:
        """The first of ``backends`` (sharded for the votes); allgather where there is no choice."""
        return self.backends[0] if self.backends else "allgather"

    def check(self, args: BuildArgs) -> None:
        """Raise ValueError naming an option this optimizer does not have."""
        if self.backends and args.backend not in self.backends:
            raise ValueError(
                f"optimizer {self.name!r} runs on backend {' or '.join(self.backends)}; got {args.backend!r}"
            )
        if args.server is not None and not self.votes:
            raise ValueError(
                f"a dedicated parameter server serves the voting optimizers ({', '.join(voting())}); "
                f"got optimizer {self.name!r}"
            )
        if args.cautious_wd and not self.cautious:
            having = ", ".join(names(cautious=True))
            raise ValueError(f"cautious weight decay is an option of {having}; got optimizer {self.name!r}")
        if args.byzantine is not None and args.byzantine.workers > 0 and not self.byzantine:
            having = ", ".join(names(byzantine=True))
            raise ValueError(f"byzantine workers are an option of {having}; got optimizer {self.name!r}")

    def check_world_size(self, world_size: int, what: str = "a world size of") -> None:
        """Refuse more than one rank for a single-process optimizer; ``what`` names the setting."""
        if self.single_process and world_size != 1:
            raise ValueError(
                f"optimizer {self.name!r} is single-process and needs {what} 1, got {what} {world_size}; "
                "use lion-global or dlion-mavo for several workers"
            )

    def make(self, params: Iterable[Any], args: BuildArgs) -> torch.optim.Optimizer:
        self.check(args)
        if self.single_process and dist.is_available() and dist.is_initialized():
            self.check_world_size(dist.get_world_size(args.process_group))
        return self.build(params, args)


def _lion(params: Iterable[Any], a: BuildArgs) -> torch.optim.Optimizer:
    return Lion(params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay, cautious_wd=a.cautious_wd)


def _dlion(vote: str, binarize: str = "sign") -> Builder:
    def build(params: Iterable[Any], a: BuildArgs) -> torch.optim.Optimizer:
        return DistributedLion(
            params,
            lr=a.lr,
            betas=a.betas,
            weight_decay=a.weight_decay,
            vote=vote,  # type: ignore[arg-type]
            process_group=a.process_group,
            seed=a.seed,
            backend=a.backend,  # type: ignore[arg-type]
            transport=a.transport,  # type: ignore[arg-type]
            server=a.server,
            cautious_wd=a.cautious_wd,
            byzantine=a.byzantine,
            timeout=a.timeout,
            start=a.start,  # type: ignore[arg-type]
            binarize=binarize,  # type: ignore[arg-type]
            procs_per_node=a.procs_per_node,
        )

    return build


def _signum(params: Iterable[Any], a: BuildArgs) -> torch.optim.Optimizer:
    """Signum with majority vote (Bernstein et al., ICLR 2019, Algorithm 1).

    Each worker keeps v <- b*v + (1-b)*g and sends sign(v); the server votes and every
    worker applies x <- x - lr*(sign(sum of signs) + wd*x). That is Distributed Lion with
    beta1 = beta2 = b: Lion's sent direction b1*m + (1-b1)*g is then Signum's new v, so the
    same kernels, backends and ledger serve it (b = betas[0]).
    """
    b = a.betas[0]
    return _dlion("majority")(params, replace(a, betas=(b, b)))


def _gathering(build: Callable[..., torch.optim.Optimizer]) -> Builder:
    def make(params: Iterable[Any], a: BuildArgs) -> torch.optim.Optimizer:
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
            start=a.start,
        )

    return make


def _global(make_inner: Callable[..., torch.optim.Optimizer]) -> Builder:
    def build(params: Iterable[Any], a: BuildArgs) -> torch.optim.Optimizer:
        inner = make_inner(params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay)
        return GlobalOptimizer(
            inner,
            a.process_group,
            transport=a.transport,
            byzantine=a.byzantine,
            seed=a.seed,
            timeout=a.timeout,
            start=a.start,
        )

    return build


def _powersgd(params: Iterable[Any], a: BuildArgs) -> torch.optim.Optimizer:
    group = a.process_group.group if isinstance(a.process_group, TorchComm) else a.process_group
    config = PowerSGDConfig(rank=a.powersgd_rank, start_iter=a.powersgd_start)
    return PowerSGD(
        params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay, process_group=group, config=config
    )


# Job defaults, from the sweep of the default job (python -m bench.sweep: 4 workers, 400 steps,
# seed 0, final validation loss). dlion-mavo's betas at lr 5e-4: (0.8, 0.9) 2.151, (0.9, 0.99)
# 2.549; then lr at (0.8, 0.9): dlion-mavo best at 1e-3 (2.000; 5e-4 2.151, 2e-3 2.643),
# lion-global at 5e-4 (2.073; 1e-3 2.395). adamw-global: 4e-3 1.921, 2e-3 1.995.
# dlion-avg, dlion-sto and the single-process lion take their family's values unswept; signum
# keeps its own (beta 0.9). Earlier sweeps: terngrad and dgc (momentum SGD) over 0.05, 0.15,
# 0.5 after 150 steps: 0.05 for both. Sign updates move every coordinate by lr, so Lion wants a
# smaller lr than AdamW and a larger weight decay to keep lr * weight_decay comparable. Beta2
# 0.99 averages over ~100 steps: too slow for a few hundred.
_VOTE_LR, _LION_LR, _LION_WD, _LION_BETAS = 1e-3, 5e-4, 0.3, (0.8, 0.9)
_ADAMW_LR = 4e-3
_GATHERING = ("allgather", "server")
# The votes give the same parameters on every backend; sharded sends the fewest bits at any N.
_VOTING = ("sharded", "allgather", "server", "hierarchical")

CATALOGUE: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(name="lion", summary="Lion on one process (the reference)", build=_lion,
              lr=_LION_LR, weight_decay=_LION_WD, betas=_LION_BETAS, cautious=True, single_process=True),
        Entry(name="dlion-mavo", summary="Distributed Lion, majority vote", build=_dlion("majority"),
              lr=_VOTE_LR, weight_decay=_LION_WD, betas=_LION_BETAS, backends=_VOTING, votes=True,
              cautious=True, byzantine=True),
        Entry(name="dlion-avg", summary="Distributed Lion, averaged signs", build=_dlion("average"),
              lr=_VOTE_LR, weight_decay=_LION_WD, betas=_LION_BETAS, backends=_VOTING, votes=True,
              cautious=True, byzantine=True),
        Entry(name="dlion-sto", summary="Distributed Lion, stochastic signs averaged (unbiased)",
              build=_dlion("average", "stochastic"), lr=_VOTE_LR, weight_decay=_LION_WD, betas=_LION_BETAS,
              backends=_VOTING, votes=True, cautious=True, byzantine=True),
        Entry(name="signum-mavo", summary="Signum with majority vote (signSGD)", build=_signum,
              lr=_LION_LR, weight_decay=_LION_WD, backends=_VOTING, votes=True, cautious=True,
              byzantine=True),
        Entry(name="terngrad", summary="TernGrad: 2-bit stochastic gradients, SGD with momentum",
              build=_gathering(build_terngrad), lr=0.05, weight_decay=1e-4, backends=_GATHERING),
        Entry(name="dgc", summary="Deep Gradient Compression: top 0.1%, momentum SGD",
              build=_gathering(build_dgc), lr=0.05, weight_decay=1e-4, backends=_GATHERING),
        Entry(name="adamw-global", summary="AdamW on fp32 all-reduced gradients",
              build=_global(torch.optim.AdamW), lr=_ADAMW_LR, weight_decay=0.1, betas=(0.9, 0.999),
              byzantine=True),
        Entry(name="powersgd", summary="AdamW after torch's DDP PowerSGD hook (rank r, error feedback)",
              build=_powersgd, lr=_ADAMW_LR, weight_decay=0.1, betas=(0.9, 0.999), ddp=True),
        Entry(name="lion-global", summary="Lion on fp32 all-reduced gradients", build=_global(Lion),
              lr=_LION_LR, weight_decay=_LION_WD, betas=_LION_BETAS, byzantine=True),
    )
}  # fmt: skip
OPTIMIZER_NAMES: tuple[str, ...] = tuple(CATALOGUE)


def entry(name: str) -> Entry:
    if name not in CATALOGUE:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    return CATALOGUE[name]


def names(**having: bool) -> tuple[str, ...]:
    """The optimizers whose rows have these flags, e.g. names(byzantine=True)."""
    return tuple(e.name for e in CATALOGUE.values() if all(getattr(e, k) == v for k, v in having.items()))


def voting() -> tuple[str, ...]:
    return names(votes=True)


def default_workers(name: str, workers: int | None, default: int) -> int:
    """The worker count a launcher uses: the one given, else 1 for a single-process optimizer."""
    if workers is None:
        return 1 if entry(name).single_process else default
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    return workers


def build_optimizer(
    name: str, params: Iterable[Any], *, betas: tuple[float, float] | None = None, **kwargs: Any
) -> torch.optim.Optimizer:
    """The optimizer called ``name``; every one has ``.ledger``. ``kwargs`` are BuildArgs
    fields; lr and weight_decay are required, betas and backend default to the row's."""
    e = entry(name)
    kwargs.setdefault("backend", e.default_backend)
    return e.make(params, BuildArgs(betas=e.betas if betas is None else betas, **kwargs))
