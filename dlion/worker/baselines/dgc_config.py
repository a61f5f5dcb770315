"""DGC's typed configuration: sparsity, warm-up, sampling, clipping, wire dtype, backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dlion.aggregate.backends import SPARSE, backend_spec
from dlion.checks import check_bool, check_int, check_number, one_of
from dlion.compress import dgc as codec
from dlion.worker.core.config import CommConfig

DGCBackend = Literal["allgather", "server"]
ValueDtype = Literal["float32", "float16"]
# The paper warms up over its first epochs (4 of 90-164 in the image runs, 2-5% of
# training); 20 steps is 5% of the training job's default 400 steps: 5 steps at each of
# 75%, 93.75%, 98.4375%, 99.6% sparsity.
DEFAULT_WARMUP_STEPS = 20


@dataclass(frozen=True, kw_only=True)
class DGCConfig(CommConfig):
    """How DGC compresses and communicates; lr and weight decay live in the param groups.

    momentum:        SGD momentum m, also the factor of the momentum correction.
    sparsity:        final fraction of each compressed tensor *not* sent (0.999: 0.1% sent).
    warmup_steps, warmup_stages: the first ``warmup_steps`` steps split evenly into stages
                     of sparsity 75%, 93.75%, 98.4375%, 99.6% (4x less sent each stage,
                     never below the final sparsity). 0 steps: no warm-up.
    sample_ratio:    fraction of a tensor sampled to estimate the top-k threshold (the
                     reference's 1%); 1.0 takes the threshold from the whole tensor.
    clip_norm:       local gradient clipping: each rank scales its gradients to an L2 norm
                     of at most clip_norm / sqrt(N) (paper section 3.2). None: off.
    momentum_masking: zero the momentum where entries were sent (paper section 3.3).
    value_dtype:     "float32" or "float16" for the sent values; indices are int32 and the
                     dense tensors fp32 either way.
    min_numel:       tensors with fewer elements go dense even when they have 2+ dimensions
                     (0: the reference's rule, every tensor of 2+ dimensions is compressed).
    backend:         "allgather": every rank gathers every message and decodes it; dense
                     tensors are all-reduced. "server": rank 0 gathers every message (dense
                     tensors included), decodes it and broadcasts the dense fp32 average.
    transport, nonfinite, seed, timeout: as in CommConfig; ``seed`` keys the sample
                     offsets (derive_key(seed, SAMPLE_STREAM, step, rank, tensor)).
    """

    momentum: float = 0.9
    sparsity: float = 0.999
    warmup_steps: int = DEFAULT_WARMUP_STEPS
    warmup_stages: int = 4
    sample_ratio: float = 0.01
    clip_norm: float | None = None
    momentum_masking: bool = True
    value_dtype: ValueDtype = "float32"
    min_numel: int = 0
    backend: DGCBackend = "allgather"

    def __post_init__(self) -> None:
        check_number("momentum", self.momentum, low=0, high=1, high_open=True)
        check_number("sparsity", self.sparsity, low=0, high=1, high_open=True)
        check_number("sample_ratio", self.sample_ratio, low=0, high=1, low_open=True)
        check_number("clip_norm", self.clip_norm, low=0, low_open=True, or_none=True)
        for name in ("warmup_steps", "warmup_stages", "min_numel"):
            check_int(name, getattr(self, name), low=0)
        one_of("value_dtype", self.value_dtype, tuple(codec.VALUE_DTYPES))
        backend_spec(self.backend, SPARSE)
        check_bool("momentum_masking", self.momentum_masking)
        super().__post_init__()
