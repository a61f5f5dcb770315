"""dlion: Distributed Lion, communication-efficient distributed training with 1-bit updates."""

import os

# Numba's OpenMP threads otherwise spin after every parallel kernel, costing milliseconds
# per call when ranks share cores. Effective when dlion is imported before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from dlion.server import ParameterServer, WorkerLost, split_server
from dlion.version import VERSION
from dlion.worker.agreement import NonFiniteGradientError
from dlion.worker.distributed_lion import DistributedLion
from dlion.worker.global_opt import GlobalOptimizer
from dlion.worker.lion import Lion, lion_update

__version__ = VERSION

__all__ = [
    "DistributedLion",
    "GlobalOptimizer",
    "Lion",
    "NonFiniteGradientError",
    "ParameterServer",
    "WorkerLost",
    "__version__",
    "lion_update",
    "split_server",
]
