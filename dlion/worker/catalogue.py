"""The one catalogue of optimizers: a row each, and what the job, the CLI, the launchers and
the benchmarks ask about them.

A row holds its builder, its defaults (lr and weight decay of the training job, betas of the
library), what it sends (so the backends that carry it, from dlion.aggregate.backends), and
its own options class: the settings only it has (cautious weight decay, byzantine workers, a
dedicated server, PowerSGD's rank). A builder gets the job's shared arguments (``BuildArgs``)
and an instance of its row's options, and builds its optimizer's config from both. Adding a
baseline is adding a row; nothing else lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.distributed as dist

from dlion.aggregate.backends import CODES, SIGNS, SPARSE, names_for
from dlion.checks import check_int
from dlion.transport import Comm
from dlion.transport.base import torch_group_of
from dlion.worker.baselines.dgc import DGC, DGCConfig
from dlion.worker.baselines.global_opt import GlobalConfig, GlobalOptimizer
from dlion.worker.baselines.powersgd import PowerSGD, PowerSGDConfig
from dlion.worker.baselines.terngrad import TernGradConfig, build_terngrad
from dlion.worker.core.build_args import (
    BuildArgs,
    ByzantineOptions,
    CautiousOptions,
    Options,
    VoteOptions,
    option_refused,
)
from dlion.worker.core.lion import Lion
from dlion.worker.lion.config import DistributedLionConfig
from dlion.worker.lion.distributed_lion import DistributedLion
from dlion.worker.local.build import DILOCO_OUTER_LR, DILOCO_OUTER_MOMENTUM, diloco, local_lion
from dlion.worker.local.config import DiLoCoOptions, LocalStepsConfig, LocalVoteOptions

Builder = Callable[[Iterable[Any], BuildArgs, Any], torch.optim.Optimizer]


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One optimizer. ``payload`` None: it has no aggregation to place (a dense all-reduce,
    or one process), and any backend setting is accepted and ignored."""

    name: str
    summary: str
    build: Builder  # (params, shared arguments, an instance of ``options``) -> the optimizer
    lr: float  # the training job's default, from sweeps of the default job
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.99)  # the job's default, and build_optimizer's
    options: type = Options  # its own settings beyond BuildArgs
    payload: str | None = None  # what it sends to be combined: its backends are those carrying it
    default_backend: str = "allgather"  # the training job's default, one of ``backends``
    single_process: bool = False
    ddp: bool = False  # communicates inside DDP's backward: train through ``opt.wrap(module)``

    @property
    def backends(self) -> tuple[str, ...]:
        return names_for(self.payload) if self.payload is not None else ()

    @property
    def option_names(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self.options))

    @property
    def votes(self) -> bool:
        """Sends sign bits to a vote, so a dedicated server process can serve it."""
        return "server" in self.option_names

    @property
    def cautious(self) -> bool:
        return "cautious_wd" in self.option_names

    @property
    def byzantine(self) -> bool:
        return "byzantine" in self.option_names

    def options_of(self, **given: Any) -> Any:
        """This row's options from keywords. One it does not have is refused, naming the
        rows that have it, unless it is off (None or False)."""
        for name, value in given.items():
            if name in self.option_names or value is None or value is False:
                continue
            having = [e.name for e in CATALOGUE.values() if name in e.option_names]
            if not having:
                raise TypeError(f"no optimizer has an option {name!r}; got it for {self.name!r}")
            raise option_refused(name, having, self.name)
        return self.options(**{k: v for k, v in given.items() if k in self.option_names})

    def check(self, args: BuildArgs) -> None:
        """Raise ValueError naming a backend or an options object this optimizer does not take."""
        if self.backends and args.backend not in self.backends:
            raise ValueError(
                f"optimizer {self.name!r} runs on backend {' or '.join(self.backends)}; got {args.backend!r}"
            )
        # Exactly its class: a richer one (VoteOptions for ByzantineOptions) would carry
        # settings this row then ignores without a word.
        if args.options is not None and type(args.options) is not self.options:
            raise ValueError(
                f"optimizer {self.name!r} takes options {self.options.__name__}, "
                f"got {type(args.options).__name__}"
            )

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
        return self.build(params, args, self.options() if args.options is None else args.options)


def _lion(params: Iterable[Any], a: BuildArgs, o: CautiousOptions) -> torch.optim.Optimizer:
    return Lion(params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay, cautious_wd=o.cautious_wd)


def _vote_config(a: BuildArgs, o: VoteOptions, vote: str, binarize: str = "sign") -> DistributedLionConfig:
    return a.config(
        DistributedLionConfig,
        vote=vote,
        binarize=binarize,
        backend=a.backend,
        cautious_wd=o.cautious_wd,
        byzantine=o.byzantine,
        procs_per_node=o.procs_per_node,
        dedicated_server=o.server is not None,
    )


def _dlion(vote: str, binarize: str = "sign") -> Builder:
    def build(params: Iterable[Any], a: BuildArgs, o: VoteOptions) -> torch.optim.Optimizer:
        config = _vote_config(a, o, vote, binarize)
        return DistributedLion(
            params,
            lr=a.lr,
            betas=a.betas,
            weight_decay=a.weight_decay,
            config=config,
            process_group=a.process_group,
            server=o.server,
        )

    return build


def _dlion_local(vote: str) -> Builder:
    def build(params: Iterable[Any], a: BuildArgs, o: LocalVoteOptions) -> torch.optim.Optimizer:
        if o.server is not None:  # its loop bounds the wait for each step's message by the timeout
            raise ValueError(
                "a dedicated parameter server waits for every worker's message within its timeout, and "
                "local steps send one every H steps: use backend 'server' with the server on rank 0"
            )
        outer = _vote_config(a, o, vote)
        local = LocalStepsConfig(
            local_steps=o.local_steps, outer_lr=o.resolved_outer_lr, error_feedback=o.error_feedback
        )
        return local_lion(
            params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay, local=local, outer=outer,
            outer_momentum=o.outer_momentum, inner=o.inner, process_group=a.process_group, server=o.server,
        )  # fmt: skip

    return build


def _diloco(params: Iterable[Any], a: BuildArgs, o: DiLoCoOptions) -> torch.optim.Optimizer:
    return diloco(
        params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay, local_steps=o.local_steps,
        outer=a.config(GlobalConfig), process_group=a.process_group,
        outer_lr=DILOCO_OUTER_LR if o.outer_lr is None else o.outer_lr,
        outer_momentum=DILOCO_OUTER_MOMENTUM if o.outer_momentum is None else o.outer_momentum,
        outer_bits=o.outer_bits,
    )  # fmt: skip


def _signum(params: Iterable[Any], a: BuildArgs, o: VoteOptions) -> torch.optim.Optimizer:
    """Signum with majority vote (Bernstein et al., ICLR 2019, Algorithm 1).

    Each worker keeps v <- b*v + (1-b)*g and sends sign(v); the server votes and every
    worker applies x <- x - lr*(sign(sum of signs) + wd*x). That is Distributed Lion with
    beta1 = beta2 = b: Lion's sent direction b1*m + (1-b1)*g is then Signum's new v, so the
    same kernels, backends and ledger serve it (b = betas[0]).
    """
    b = a.betas[0]
    return _dlion("majority")(params, replace(a, betas=(b, b)), o)


def _terngrad(params: Iterable[Any], a: BuildArgs, o: Options) -> torch.optim.Optimizer:
    config, group = a.config(TernGradConfig, backend=a.backend), a.process_group
    return build_terngrad(
        params, lr=a.lr, weight_decay=a.weight_decay, betas=a.betas, process_group=group, config=config
    )


def _dgc(params: Iterable[Any], a: BuildArgs, o: Options) -> torch.optim.Optimizer:
    """DGC's momentum is betas[0] (betas[1] is unused); the rest are DGCConfig's defaults."""
    config = a.config(DGCConfig, momentum=a.betas[0], backend=a.backend)
    return DGC(params, lr=a.lr, weight_decay=a.weight_decay, process_group=a.process_group, config=config)


def _global(make_inner: Callable[..., torch.optim.Optimizer]) -> Builder:
    def build(params: Iterable[Any], a: BuildArgs, o: ByzantineOptions) -> torch.optim.Optimizer:
        inner = make_inner(params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay)
        return GlobalOptimizer(inner, a.process_group, config=a.config(GlobalConfig, byzantine=o.byzantine))

    return build


def _powersgd(params: Iterable[Any], a: BuildArgs, o: PowerSGDConfig) -> torch.optim.Optimizer:
    # DDP's hook runs torch's own collectives: on a dlion Comm, the torch group underneath.
    group = a.process_group
    if isinstance(group, Comm):
        group = torch_group_of(group)
        if group is None:
            raise ValueError(
                f"powersgd runs torch's DDP hook: it needs a torch.distributed process group, not a "
                f"{type(a.process_group).__name__}"
            )
    return PowerSGD(
        params, lr=a.lr, betas=a.betas, weight_decay=a.weight_decay, process_group=group, config=o
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
# The votes give the same parameters on every backend; sharded sends the fewest bits at any N.
_VOTE_DEFAULT = "sharded"

CATALOGUE: dict[str, Entry] = {
    e.name: e
    for e in (
        Entry(name="lion", summary="Lion on one process (the reference)", build=_lion,
              lr=_LION_LR, weight_decay=_LION_WD, betas=_LION_BETAS, options=CautiousOptions,
              single_process=True),
        Entry(name="dlion-mavo", summary="Distributed Lion, majority vote", build=_dlion("majority"),
              lr=_VOTE_LR, weight_decay=_LION_WD, betas=_LION_BETAS, options=VoteOptions, payload=SIGNS,
              default_backend=_VOTE_DEFAULT),
        Entry(name="dlion-avg", summary="Distributed Lion, averaged signs", build=_dlion("average"),
              lr=_VOTE_LR, weight_decay=_LION_WD, betas=_LION_BETAS, options=VoteOptions, payload=SIGNS,
              default_backend=_VOTE_DEFAULT),
        Entry(name="dlion-sto", summary="Distributed Lion, stochastic signs averaged (unbiased)",
              build=_dlion("average", "stochastic"), lr=_VOTE_LR, weight_decay=_LION_WD, betas=_LION_BETAS,
              options=VoteOptions, payload=SIGNS, default_backend=_VOTE_DEFAULT),
        Entry(name="signum-mavo", summary="Signum with majority vote (signSGD)", build=_signum,
              lr=_LION_LR, weight_decay=_LION_WD, options=VoteOptions, payload=SIGNS,
              default_backend=_VOTE_DEFAULT),
        Entry(name="terngrad", summary="TernGrad: 2-bit stochastic gradients, SGD with momentum",
              build=_terngrad, lr=0.05, weight_decay=1e-4, payload=CODES),
        Entry(name="dgc", summary="Deep Gradient Compression: top 0.1%, momentum SGD",
              build=_dgc, lr=0.05, weight_decay=1e-4, payload=SPARSE),
        Entry(name="adamw-global", summary="AdamW on fp32 all-reduced gradients",
              build=_global(torch.optim.AdamW), lr=_ADAMW_LR, weight_decay=0.1, betas=(0.9, 0.999),
              options=ByzantineOptions),
        Entry(name="powersgd", summary="AdamW after torch's DDP PowerSGD hook (rank r, error feedback)",
              build=_powersgd, lr=_ADAMW_LR, weight_decay=0.1, betas=(0.9, 0.999), options=PowerSGDConfig,
              ddp=True),
        Entry(name="lion-global", summary="Lion on fp32 all-reduced gradients", build=_global(Lion),
              lr=_LION_LR, weight_decay=_LION_WD, betas=_LION_BETAS, options=ByzantineOptions),
        Entry(name="dlion-local", summary="H local Lion steps, a majority vote of pseudo-gradient signs",
              build=_dlion_local("majority"), lr=_VOTE_LR, weight_decay=_LION_WD, betas=_LION_BETAS,
              options=LocalVoteOptions, payload=SIGNS, default_backend=_VOTE_DEFAULT),
        Entry(name="dlion-local-avg", summary="H local Lion steps, pseudo-gradient signs averaged",
              build=_dlion_local("average"), lr=_VOTE_LR, weight_decay=_LION_WD, betas=_LION_BETAS,
              options=LocalVoteOptions, payload=SIGNS, default_backend=_VOTE_DEFAULT),
        Entry(name="diloco", summary="DiLoCo: H local AdamW steps, outer Nesterov SGD, fp32",
              build=_diloco, lr=_ADAMW_LR, weight_decay=0.1, betas=(0.9, 0.999), options=DiLoCoOptions),
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
    check_int("--workers", workers, low=1, expected=">= 1")
    return workers


def build_optimizer(
    name: str, params: Iterable[Any], *, betas: tuple[float, float] | None = None, **kwargs: Any
) -> torch.optim.Optimizer:
    """The optimizer called ``name``; every one has ``.ledger``. ``kwargs`` are BuildArgs
    fields (lr and weight_decay required; betas and backend default to the row's) and the
    row's own options (``byzantine=``, ``cautious_wd=``, ...), or its options object whole
    as ``options=``."""
    e = entry(name)
    shared = {f.name for f in fields(BuildArgs)}
    own = {k: kwargs.pop(k) for k in list(kwargs) if k not in shared}
    if own:
        if kwargs.get("options") is not None:
            raise TypeError(f"give {name!r} its options as options= or as keywords, not both")
        kwargs["options"] = e.options_of(**own)
    kwargs.setdefault("backend", e.default_backend)
    return e.make(params, BuildArgs(betas=e.betas if betas is None else betas, **kwargs))
