"""What a row of the catalogue (dlion.worker.catalogue) builds its optimizer from: the job's
shared arguments (``BuildArgs``), the same for every optimizer, and the row's own options.

Each row names one options class here (or its optimizer's own config, as powersgd names
PowerSGDConfig), and its builder reads the instance it is handed. A caller that sets an
option a row does not have is refused, naming the rows that have it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from dlion.checks import check_bool, check_instance, check_int
from dlion.server import ServerLink
from dlion.worker.core.byzantine import Byzantine
from dlion.worker.core.config import CommConfig

C = TypeVar("C", bound=CommConfig)


@dataclass(frozen=True, kw_only=True)
class BuildArgs:
    """What every row's builder gets besides the parameters: the job's hyperparameters and
    where the ranks meet, the same for every optimizer; and the row's own ``options``."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    seed: int = 0
    process_group: Any = None  # a torch ProcessGroup, an mpi4py communicator, or a dlion Comm
    backend: str = "allgather"  # where a vote or a gather runs; see each row's ``backends``
    transport: str = "torch"  # torch.distributed or mpi (mpi4py)
    timeout: timedelta | None = None  # bound on every collective wait (None: the process group's)
    start: str = "broadcast"  # ranks start equal: "broadcast" rank 0's parameters, or "verify"
    options: Any = None  # an instance of the row's ``options`` class (None: its defaults)

    def config(self, cls: type[C], **own: Any) -> C:
        """An optimizer's config: the shared seed, transport, timeout and start, and ``own``."""
        shared: dict[str, Any] = {"transport": self.transport, "timeout": self.timeout, "start": self.start}
        return cls(seed=self.seed, **shared, **own)


@dataclass(frozen=True, kw_only=True)
class Options:
    """A row's own options: none (every setting of its optimizer comes from BuildArgs)."""

    def __post_init__(self) -> None:
        """Each subclass checks its own fields, then calls this (cooperative, for the mixes)."""


@dataclass(frozen=True, kw_only=True)
class CautiousOptions(Options):
    cautious_wd: bool = False  # decay only where the update and the parameter agree in sign

    def __post_init__(self) -> None:
        check_bool("cautious_wd", self.cautious_wd)
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class ByzantineOptions(Options):
    byzantine: Byzantine | None = None  # attacking ranks (the last K)

    def __post_init__(self) -> None:
        check_instance("byzantine", self.byzantine, Byzantine, or_none=True)
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class VoteOptions(CautiousOptions, ByzantineOptions):
    """The voting rows' own: cautious weight decay, byzantine workers, a dedicated parameter
    server's link, and the ranks per node of backend "hierarchical" (None: LOCAL_WORLD_SIZE)."""

    server: ServerLink | None = None
    procs_per_node: int | None = None

    def __post_init__(self) -> None:
        check_instance("server", self.server, ServerLink, or_none=True)
        check_int("procs_per_node", self.procs_per_node, low=1, or_none=True)
        super().__post_init__()


# How a refusal names an option a row does not have (the option's name where not listed).
_SAYS = {
    "cautious_wd": "cautious weight decay is",
    "byzantine": "byzantine workers are",
    "server": "a dedicated parameter server is",
}


def option_refused(option: str, having: list[str], optimizer: str) -> ValueError:
    """The error for ``option`` given to ``optimizer``, which lacks it; ``having`` have it."""
    says = _SAYS.get(option, f"{option} is")
    return ValueError(f"{says} an option of {', '.join(having)}; got optimizer {optimizer!r}")
