"""The training job's configuration: four sections, one frozen config, validated when built.

Each section is a keyword-only dataclass whose field docstrings are the ``--help`` text of its
flags (dlion.train.args). ``TrainConfig`` is all four: a flat config (``cfg.lr``), so the
report and the worker argv name every value once. Per-optimizer defaults (lr, weight decay)
come from the optimizer catalogue when the config is built, so every rank and the report
see the values used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import timedelta
from typing import Any

from dlion.aggregate.backends import BACKENDS
from dlion.checks import check_bool, check_int, check_number, one_of
from dlion.compress.quant import check_bits
from dlion.server import ServerLink
from dlion.transport import TRANSPORTS
from dlion.worker.catalogue import OPTIMIZER_NAMES, entry
from dlion.worker.core.build_args import BuildArgs
from dlion.worker.core.byzantine import ATTACKS, Byzantine

# launch/cluster.py checks its own flags with these, imported from here.
check_float = check_number

TASKS: tuple[str, ...] = ("bytes", "digits")
SAMPLINGS: tuple[str, ...] = ("random", "stream")
SERVER_PLACEMENTS: tuple[str, ...] = ("rank0", "dedicated")


def _choices(values: tuple[str, ...]) -> dict[str, Any]:
    return {"choices": values}


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """What is trained, on what data."""

    task: str = field(default="bytes", metadata=_choices(TASKS))
    """bytes: the byte-level transformer on the Python standard library; digits: a small CNN on
    scikit-learn's handwritten digits"""
    context: int = 128
    """bytes per window"""
    d_model: int = 128
    """transformer width"""
    layers: int = 4
    """transformer blocks"""
    heads: int = 4
    """attention heads (must divide d-model)"""
    data_bytes: int = 4_000_000
    """corpus size cap in bytes"""
    sampling: str = field(default="random", metadata=_choices(SAMPLINGS))
    """bytes: how each rank draws its training windows. random: at random offsets, with
    replacement; stream: non-overlapping windows in a seeded order per epoch, each rank its
    own, so no byte is trained on twice before every byte has been (the report's corpus
    says how many epochs a run walked)"""

    def _check_model(self) -> None:
        one_of("task", self.task, TASKS)
        one_of("sampling", self.sampling, SAMPLINGS)
        if self.sampling == "stream" and self.task != "bytes":
            raise ValueError(
                f"sampling='stream' walks the byte corpus in windows; task {self.task!r} takes "
                "sampling='random'"
            )
        for name in ("context", "d_model", "layers", "heads"):
            check_int(name, getattr(self, name), low=1)
        check_int("data_bytes", self.data_bytes, low=1024)
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")


@dataclass(frozen=True, kw_only=True)
class OptimizerSection:
    """How the model's parameters move."""

    optimizer: str = field(default="dlion-mavo", metadata=_choices(OPTIMIZER_NAMES))
    """one of dlion's optimizers (dlion.worker.catalogue)"""
    lr: float | None = None
    """peak learning rate (default: the optimizer's, from the catalogue)"""
    weight_decay: float | None = None
    """weight decay (default: the optimizer's, from the catalogue)"""
    beta1: float | None = None
    """first momentum coefficient (SGD momentum for terngrad and dgc; default: the optimizer's)"""
    beta2: float | None = None
    """second momentum coefficient (default: the optimizer's)"""
    cautious_wd: bool = False
    """cautious weight decay (Chen et al. 2025): decay only where the update and the parameter
    agree in sign; Lion and the voting optimizers"""
    powersgd_rank: int = 4
    """powersgd: the rank of its gradient approximation (its uncompressed all-reduce runs for
    max(2, warmup-steps) steps first)"""
    local_steps: int = 16
    """dlion-local, dlion-local-avg, diloco: inner steps per round; the ranks meet at every H-th
    step"""
    outer_lr: float | None = None
    """dlion-local: the outer sign step as a multiple of the current inner lr (default: local-steps
    / 2); diloco: the outer Nesterov SGD's lr (default 0.7)"""
    outer_momentum: float | None = None
    """dlion-local: beta1 of each rank's outer sign momentum on its pseudo-gradients (default 0:
    none); diloco: the outer Nesterov momentum (default 0.9)"""
    error_feedback: bool = False
    """dlion-local: each rank adds what its sign did not carry to its next pseudo-gradient"""
    outer_bits: int | None = field(default=None, metadata={"choices": (8, 4)})
    """diloco: send the pseudo-gradient quantized to 8 or 4 bits, an fp32 scale per 1024 values,
    in a reduce-scatter and all-gather (default: the fp32 ring all-reduce)"""
    warmup_steps: int | None = None
    """linear warmup before the cosine decay (default: steps // 10)"""
    min_lr_ratio: float = 0.1
    """final lr / peak lr"""

    def _check_optimizer(self) -> None:
        one_of("optimizer", self.optimizer, OPTIMIZER_NAMES)
        row = entry(self.optimizer)
        if self.lr is None:
            object.__setattr__(self, "lr", row.lr)
        if self.weight_decay is None:
            object.__setattr__(self, "weight_decay", row.weight_decay)
        for name, default in zip(("beta1", "beta2"), row.betas, strict=True):
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        check_number("lr", self.lr, low=0, low_open=True)
        check_number("weight_decay", self.weight_decay, low=0)
        for name in ("beta1", "beta2"):
            check_number(name, getattr(self, name), low=0, high=1, high_open=True)
        check_bool("cautious_wd", self.cautious_wd)
        check_number("min_lr_ratio", self.min_lr_ratio, low=0, high=1)
        check_int("powersgd_rank", self.powersgd_rank, low=1)
        check_int("local_steps", self.local_steps, low=1)
        check_number("outer_lr", self.outer_lr, low=0, low_open=True, or_none=True)
        check_number("outer_momentum", self.outer_momentum, low=0, high=1, high_open=True, or_none=True)
        check_bool("error_feedback", self.error_feedback)
        check_bits("outer_bits", self.outer_bits)


@dataclass(frozen=True, kw_only=True)
class CommSection:
    """How the workers communicate."""

    backend: str | None = field(default=None, metadata=_choices(tuple(BACKENDS)))
    """where a vote or a gather runs: sharded (each rank votes a shard), every rank on all bits
    (allgather), a parameter server, or hierarchical (nodes vote; see --procs-per-node)
    (default: the optimizer's: sharded for the votes, allgather for terngrad and dgc)"""
    server: str = field(default="rank0", metadata=_choices(SERVER_PLACEMENTS))
    """with --backend server: the server on rank 0, or a dedicated process that trains nothing
    (one process more than the workers)"""
    transport: str = field(default="torch", metadata=_choices(TRANSPORTS))
    """torch.distributed (Gloo/NCCL), or MPI through mpi4py, launched under mpiexec"""
    procs_per_node: int | None = field(default=None, metadata={"metavar": "K"})
    """with --backend hierarchical: ranks per node; nodes vote on their ranks' mean gradient
    (default: the launcher's LOCAL_WORLD_SIZE)"""
    byzantine: int = field(default=0, metadata={"metavar": "K"})
    """the last K ranks attack, sending corrupted updates"""
    attack: str = field(default="flip", metadata=_choices(ATTACKS))
    """what the attackers send: flip (inverted signs, negated gradients), random, or zero"""
    timeout_s: float = 120.0
    """bound on every collective wait, in seconds"""
    virtual_workers: int = field(default=0, metadata={"metavar": "N"})
    """run N workers as threads of this one process, taking turns: the same batches, votes,
    coins and bytes as N processes, for studying many workers on few cores (0: real processes)"""

    def _check_comm(self) -> None:
        one_of("backend", self.backend, tuple(BACKENDS))
        one_of("server", self.server, SERVER_PLACEMENTS)
        one_of("transport", self.transport, TRANSPORTS)
        Byzantine(workers=self.byzantine, attack=self.attack)  # raises naming a bad value
        check_number("timeout_s", self.timeout_s, low=0, low_open=True)
        check_int("virtual_workers", self.virtual_workers, low=0)
        check_int("procs_per_node", self.procs_per_node, low=1, or_none=True)


@dataclass(frozen=True, kw_only=True)
class RunSection:
    """How long, how often, and where the results go."""

    steps: int = 400
    """optimizer steps"""
    batch_size: int = 16
    """examples (windows) per rank per step"""
    seed: int = 0
    """model init, batch order and every coin of the optimizer"""
    eval_every: int = 50
    """steps between validation"""
    eval_batches: int = 8
    """fixed validation batches"""
    checkpoint_every: int = 0
    """steps between checkpoints; 0: only at the end"""
    checkpoint_dir: str | None = None
    """a folder every rank can reach: checkpoint there, and resume from its latest checkpoint
    when there is one (default: no checkpoints)"""
    out: str | None = None
    """report directory (default:
    runs/<task>-<optimizer>[-<backend>][-mpi][-dedicated][-virtual]-w<workers>-s<seed>)"""
    overwrite: bool = False
    """replace a finished run's report in --out (without it, such a folder is refused)"""

    def _check_run(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            check_int(name, getattr(self, name), low=1)
        for name in ("seed", "checkpoint_every"):
            check_int(name, getattr(self, name), low=0)
        check_bool("overwrite", self.overwrite)


SECTIONS = (ModelSection, OptimizerSection, CommSection, RunSection)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunSection, CommSection, OptimizerSection, ModelSection):
    """One training run: every section's fields, checked together when built."""

    def __post_init__(self) -> None:
        self._check_model()
        self._check_optimizer()
        if self.backend is None:
            object.__setattr__(self, "backend", entry(self.optimizer).default_backend)
        self._check_comm()
        self._check_run()
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", self.steps // 10)
        check_int("warmup_steps", self.warmup_steps, low=0)
        row = entry(self.optimizer)
        if self.server == "dedicated" and (self.backend != "server" or not row.votes):
            raise ValueError(
                f"server='dedicated' is a parameter-server process for the voting optimizers with "
                f"backend='server'; got optimizer {self.optimizer!r} with backend {self.backend!r}"
            )
        if self.virtual_workers:
            self._check_virtual()
        byzantine = Byzantine(workers=self.byzantine, attack=self.attack) if self.byzantine else None
        row.check(self.build_args(byzantine=byzantine))

    def _check_virtual(self) -> None:
        row = entry(self.optimizer)
        row.check_world_size(self.virtual_workers, "--virtual-workers")
        if row.ddp:
            raise ValueError(
                f"optimizer {self.optimizer!r} runs inside torch's DistributedDataParallel, which needs "
                "real processes; use --workers N instead of --virtual-workers"
            )
        if self.transport != "torch" or self.server == "dedicated":
            raise ValueError(
                "virtual workers talk through threads of one process: they take the default transport "
                f"and no dedicated server; got transport {self.transport!r}, server {self.server!r}"
            )

    def build_args(
        self,
        *,
        process_group: Any = None,
        timeout: timedelta | None = None,
        server: ServerLink | None = None,
        byzantine: Byzantine | None = None,
    ) -> BuildArgs:
        """The optimizer's arguments, with what only a running job knows: its process group
        and timeout (shared by every optimizer), a dedicated server's link and the attackers
        (options of the rows that have them; refused by the others)."""
        assert self.lr is not None and self.weight_decay is not None  # resolved when built
        assert self.backend is not None and self.beta1 is not None and self.beta2 is not None
        row = entry(self.optimizer)
        # Settings reach the rows that have them and the others ignore them, as their flags'
        # help says (--powersgd-rank is powersgd's; its fp32 warm-up follows the lr warm-up).
        settings: dict[str, Any] = {
            "procs_per_node": self.procs_per_node,
            "rank": self.powersgd_rank,
            "start_iter": max(2, self.warmup_steps or 0),
            "local_steps": self.local_steps,
        }
        # The outer step's settings are refused by the rows without one, when given.
        outer = {"outer_momentum": self.outer_momentum} if self.outer_momentum is not None else {}
        options = row.options_of(
            cautious_wd=self.cautious_wd,
            byzantine=byzantine,
            server=server,
            error_feedback=self.error_feedback,
            outer_lr=self.outer_lr,
            outer_bits=self.outer_bits,
            **outer,
            **{k: v for k, v in settings.items() if k in row.option_names},
        )
        return BuildArgs(
            lr=self.lr,
            weight_decay=self.weight_decay,
            betas=(self.beta1, self.beta2),
            seed=self.seed,
            process_group=process_group,
            backend=self.backend,
            transport=self.transport,
            timeout=timeout,
            options=options,
        )

    def to_argv(self) -> list[str]:
        """Every value as a flag, so a worker parses back exactly this config."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                argv += [f"--{f.name.replace('_', '-')}", str(value)]
        return argv

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
