"""dlion: Distributed Lion, communication-efficient distributed training with 1-bit updates."""

from dlion.integrations.ddp import attach
from dlion.server import ParameterServer, WorkerLost, split_server
from dlion.version import VERSION
from dlion.worker.baselines.dgc import DGC, DGCConfig
from dlion.worker.baselines.global_opt import GlobalOptimizer
from dlion.worker.baselines.terngrad import TernGrad, TernGradConfig
from dlion.worker.catalogue import build_optimizer
from dlion.worker.core.checks import GradientChangedError, NonFiniteGradientError
from dlion.worker.core.lion import Lion, lion_update
from dlion.worker.core.saved_state import gather_optimizer_state, load_optimizer_state, save_optimizer_state
from dlion.worker.lion.config import DistributedLionConfig
from dlion.worker.lion.distributed_lion import DistributedLion
from dlion.worker.local.build import diloco, local_lion
from dlion.worker.local.config import LocalStepsConfig
from dlion.worker.local.optimizer import LocalSteps

__version__ = VERSION

__all__ = [
    "DGC",
    "DGCConfig",
    "DistributedLion",
    "DistributedLionConfig",
    "GlobalOptimizer",
    "GradientChangedError",
    "Lion",
    "LocalSteps",
    "LocalStepsConfig",
    "NonFiniteGradientError",
    "ParameterServer",
    "TernGrad",
    "TernGradConfig",
    "WorkerLost",
    "__version__",
    "attach",
    "build_optimizer",
    "diloco",
    "gather_optimizer_state",
    "lion_update",
    "load_optimizer_state",
    "local_lion",
    "save_optimizer_state",
    "split_server",
]
