"""What the Numba CPU kernels share: the splitmix64 draw, argument checks, thread policy."""

from __future__ import annotations

import os

import numpy as np
import torch
from numba import njit

from dlion import wire

_GOLDEN = np.uint64(wire.GOLDEN)
_MIX1 = np.uint64(wire.MIX1)
_MIX2 = np.uint64(wire.MIX2)
_S1, _S2, _S3 = (np.uint64(s) for s in wire.SHIFTS)
S56 = np.uint64(56)


@njit(inline="always")
def splitmix64(key, j):  # key: uint64, j: int -> uint64, splitmix64(key + j) as in dlion.wire
    z = key + np.uint64(j) + _GOLDEN
    z = (z ^ (z >> _S1)) * _MIX1
    z = (z ^ (z >> _S2)) * _MIX2
    return z ^ (z >> _S3)


@njit(inline="always")
def coin(key, j):  # key: uint64, j: int -> uint8, the top byte of splitmix64(key + j)
    return np.uint8(splitmix64(key, j) >> S56)


def upload(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array as a torch tensor on ``device`` without blocking the host (pinned
    staging for CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(values))
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def as_key(key: int | np.integer) -> np.uint64:
    """A key as uint64. Numba would type a small Python int as int64 (arithmetic shifts)
    and reject one >= 2**63 once that int64 signature exists."""
    return np.uint64(int(key) & wire.MASK64)


def check_sign_step(grad: np.ndarray, exp_avg: np.ndarray, out: np.ndarray) -> None:
    """A worker sign step's arguments: float32 grad and exp_avg of one size, uint8 out of
    at least ceil(n/8) bytes; ValueError naming what does not fit."""
    check_1d("grad", grad, np.float32)
    check_1d("exp_avg", exp_avg, np.float32)
    check_1d("out", out, np.uint8)
    if exp_avg.size != grad.size or out.size < (grad.size + 7) // 8:
        raise ValueError(
            f"size mismatch: grad {grad.size}, exp_avg {exp_avg.size}, out {out.size} bytes "
            f"(need exp_avg == grad and out >= {(grad.size + 7) // 8})"
        )


def check_1d(name: str, a: np.ndarray, dtype: type | None = None) -> None:
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")


_threads_ready = False


def ready_threads() -> None:
    """Called before the first parallel kernel: Numba's OpenMP threads otherwise spin after
    every kernel, costing milliseconds per call when ranks share cores. OpenMP reads
    OMP_WAIT_POLICY when Numba first loads it, which is at that first kernel; a user's own
    setting wins. Importing dlion changes nothing in the environment."""
    global _threads_ready
    if not _threads_ready:
        os.environ.setdefault("OMP_WAIT_POLICY", "passive")
        _threads_ready = True
