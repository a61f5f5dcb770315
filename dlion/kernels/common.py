"""What the Numba CPU kernels share: the splitmix64 draw, argument checks, thread policy."""

from __future__ import annotations

import os

import numba
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


def ready_threads() -> None:
    """Called before every parallel kernel. Numba runs as many threads as torch has (the
    launcher's OMP_NUM_THREADS, torch.set_num_threads), set per calling thread, so ranks that
    share cores do not oversubscribe them. At one thread GNU OpenMP's pool is never woken, so
    no thread spins after the kernel; at more it spins as after torch's own operations (the
    wait policy was read when torch loaded the runtime). With NUMBA_NUM_THREADS exported,
    Numba's count is the user's: it is left alone."""
    if not _launched:
        _launch()
    if not _numba_from_env:
        n = min(torch.get_num_threads(), _numba_max)
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)


_launched = False
_numba_from_env = False
_numba_max = 1


def _launch() -> None:
    """Start Numba's threading layer without changing torch's thread count: Numba's OpenMP
    layer calls omp_set_num_threads(NUMBA_NUM_THREADS) on the launching thread, and torch
    reads its count from that same runtime."""
    global _launched, _numba_from_env, _numba_max
    torch_threads = torch.get_num_threads()
    numba.get_num_threads()  # launches the layer, once per process
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    _numba_from_env = "NUMBA_NUM_THREADS" in os.environ
    _numba_max = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    _launched = True
