"""The stochastic sign step of dlion-sto: one unbiased random bit per parameter.

A worker's Lion direction c = b1*m + (1-b1)*g is scaled by its tensor's mean |c| and
clipped, u = clip(c / mean|c|, -1, 1); the bit is 1 (positive) with probability (1 + u)/2,
so the sent sign s = 2*bit - 1 has E[s] = u: the average of N workers' signs is an unbiased
estimate of their mean clipped direction, which a plain sign (E[s] = sign(c)) is not. Large
coordinates (|c| >= mean|c|) keep their sign; small ones are sent as a biased coin. The
draws are counter-based (dlion.wire): element k's uniform is the top 24 bits of
splitmix64(key + k), so the bits are fixed by (seed, step, rank, tensor).

``stochastic_sign_step_ref`` (NumPy) is the specification; ``stochastic_sign_step`` (Numba)
has its signature and gives the same bits. Both take the scale from the same NumPy float64
sum, so it does not depend on a kernel's summation order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dlion.kernels.common import as_key, check_sign_step, ready_threads, splitmix64
from dlion.kernels.reference import splitmix64_ref

_S40 = np.uint64(40)
_UNIT = np.float32(2.0**-24)  # 24-bit uniforms are exact in float32
_HALF, _ONE = np.float32(0.5), np.float32(1.0)
_CHUNK = 1 << 16  # elements per parallel task (a multiple of 8: whole bytes)


def _scale(c: np.ndarray) -> np.float32:
    """mean |c| in float32, from a float64 sum; 0 for an empty or all-zero c."""
    return np.float32(np.abs(c).sum(dtype=np.float64) / max(1, c.size))


def stochastic_sign_step_ref(
    grad: np.ndarray, exp_avg: np.ndarray, out: np.ndarray, beta1: float, beta2: float, key: int
) -> None:
    """Writes the packed stochastic signs of c into out[:ceil(n/8)] and updates exp_avg in
    place to b2*m + (1-b2)*g, as ``lion_sign_step_ref`` does."""
    check_sign_step(grad, exp_avg, out)
    n = grad.size
    b1, omb1 = np.float32(beta1), np.float32(1.0 - beta1)
    b2, omb2 = np.float32(beta2), np.float32(1.0 - beta2)
    c = b1 * exp_avg + omb1 * grad
    scale = _scale(c)
    p = (np.clip(c / scale, -_ONE, _ONE) + _ONE) * _HALF if scale > 0 else np.full(n, _HALF, np.float32)
    r = (splitmix64_ref(key, 0, n) >> _S40).astype(np.float32) * _UNIT
    out[: (n + 7) // 8] = np.packbits(r < p)
    exp_avg[...] = b2 * exp_avg + omb2 * grad


@njit(parallel=True, cache=True)
def _direction(grad, exp_avg, c, beta1, beta2):  # c <- b1*m + (1-b1)*g; m <- b2*m + (1-b2)*g
    b1, omb1 = np.float32(beta1), np.float32(1.0 - beta1)
    b2, omb2 = np.float32(beta2), np.float32(1.0 - beta2)
    for k in prange(grad.size):
        g, m = grad[k], exp_avg[k]
        c[k] = b1 * m + omb1 * g
        exp_avg[k] = b2 * m + omb2 * g


@njit(parallel=True, cache=True)
def _bits(c, out, scale, key):  # out[j] <- 8 stochastic signs of c[8j : 8j + 8], MSB first
    n = c.size
    one, half, unit = np.float32(1.0), np.float32(0.5), np.float32(2.0**-24)
    for t in prange((n + _CHUNK - 1) // _CHUNK):
        lo = t * _CHUNK
        hi = min(n, lo + _CHUNK)
        for j in range(lo // 8, (hi + 7) // 8):
            byte = 0
            for b in range(8):
                k = 8 * j + b
                bit = 0
                if k < n:
                    p = half
                    if scale > 0:
                        u = c[k] / scale
                        u = min(one, max(-one, u))
                        p = (u + one) * half
                    r = np.float32(splitmix64(key, k) >> np.uint64(40)) * unit
                    bit = 1 if r < p else 0
                byte |= bit << (7 - b)
            out[j] = np.uint8(byte)


def stochastic_sign_step(
    grad: np.ndarray, exp_avg: np.ndarray, out: np.ndarray, beta1: float, beta2: float, key: int | np.integer
) -> None:
    """Fused dlion-sto worker step; see ``stochastic_sign_step_ref`` (same bits)."""
    ready_threads()
    check_sign_step(grad, exp_avg, out)
    c = np.empty(grad.size, np.float32)
    _direction(grad, exp_avg, c, float(beta1), float(beta2))
    _bits(c, out, _scale(c), as_key(key))
