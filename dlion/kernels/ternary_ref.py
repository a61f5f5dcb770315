"""Plain NumPy references for the TernGrad kernels in ``ternary.py`` (same signatures).

The tests hold each Numba kernel to its twin here bit for bit.

Wire code, 2 bits per element, most significant first like the sign wire (docs/design.md):
element k of a packed buffer is bits (7 - 2 (k % 4), 6 - 2 (k % 4)) of byte k // 4, and

    00 = 0,   01 = +1,   10 = -1      (11 is never written; it decodes to 0)

so a value is (code & 1) - (code >> 1). Sums of N codes lie in [-N, N]: 2N + 1 levels,
sent down as the offset k + N in B = ceil(log2(2N + 1)) = bit_length(2N) bit planes, plane b
holding bit b of every element in numpy.packbits layout (like ``count_planes``).

Randomness is counter based: the draw of element j under ``key`` is
u_j = (splitmix64(key + j) >> 40) * 2^-24, 24 random bits, exact in float32. Any chunking or
thread count gives the same draws, and so does this reference.
"""

from __future__ import annotations

import numpy as np

from dlion.kernels.reference import splitmix64_ref

U24 = np.float32(2.0**-24)


def uniform24_ref(key: int, start: int, n: int) -> np.ndarray:
    """float32[n] in [0, 1): element j is the top 24 bits of splitmix64(key + start + j) * 2^-24."""
    return (splitmix64_ref(key, start, n) >> np.uint64(40)).astype(np.float32) * U24


def ternarize_ref(grad: np.ndarray, scale: float, key: int) -> np.ndarray:
    """float32[n] -> int8[n] in {-1, 0, +1}: sign(g_k) where u_k < |g_k| / scale, else 0.

    P(t_k != 0) = min(1, |g_k| / scale) up to the 2^-24 grid of u, so scale * t is an
    unbiased estimate of g wherever |g_k| <= scale and clips g to scale elsewhere. A scale
    that is not > 0 (an all-zero layer) gives all zeros.
    """
    g = np.asarray(grad, dtype=np.float32).reshape(-1)
    out = np.zeros(g.size, np.int8)
    s = np.float32(scale)
    if not s > 0:
        return out
    keep = uniform24_ref(key, 0, g.size) < np.abs(g) / s
    out[keep & (g > 0)] = 1
    out[keep & (g < 0)] = -1
    return out


def pack_ternary_ref(t: np.ndarray) -> np.ndarray:
    """int8[n] in {-1, 0, +1} -> uint8[ceil(n/4)]: 2-bit codes, zero-padded."""
    t = np.asarray(t).reshape(-1)
    nbytes = (t.size + 3) // 4
    codes = np.zeros(4 * nbytes, np.uint8)
    codes[: t.size] = np.where(t > 0, 1, np.where(t < 0, 2, 0))
    q = codes.reshape(nbytes, 4)
    return (q[:, 0] << 6) | (q[:, 1] << 4) | (q[:, 2] << 2) | q[:, 3]


def unpack_ternary_ref(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8[>= ceil(n/4)] -> int8[n] in {-1, 0, +1}."""
    b = np.asarray(packed, dtype=np.uint8)[: (n + 3) // 4]
    codes = np.stack([(b >> 6) & 3, (b >> 4) & 3, (b >> 2) & 3, b & 3], axis=1).reshape(-1)[:n]
    return (codes & 1).astype(np.int8) - (codes >> 1).astype(np.int8)


def ternarize_pack_ref(grad: np.ndarray, scale: float, key: int, out: np.ndarray) -> None:
    """Writes pack_ternary(ternarize(grad, scale, key)) into out[:ceil(n/4)]."""
    packed = pack_ternary_ref(ternarize_ref(grad, scale, key))
    out[: packed.size] = packed


def sum_ternary_ref(packed: np.ndarray) -> np.ndarray:
    """uint8[N, nbytes] of N workers' codes -> int32[4 * nbytes], the sum over workers."""
    packed = np.asarray(packed, dtype=np.uint8)
    n_slots = 4 * packed.shape[1]
    total = np.zeros(n_slots, np.int32)
    for row in packed:
        total += unpack_ternary_ref(row, n_slots)
    return total


def level_bits(n_workers: int) -> int:
    """B = ceil(log2(2N + 1)): bits for a sum of N ternary values, 2N + 1 levels."""
    return (2 * int(n_workers)).bit_length()


def pack_levels_ref(sums: np.ndarray, n_workers: int) -> np.ndarray:
    """int32[n] in [-N, N] -> uint8[B, ceil(n/8)]: bit b of (sum + N) in plane b."""
    offset = np.asarray(sums, dtype=np.int64).reshape(-1) + n_workers
    planes = [np.packbits((offset >> b) & 1) for b in range(level_bits(n_workers))]
    return np.stack(planes).reshape(len(planes), (offset.size + 7) // 8)


def unpack_levels_ref(planes: np.ndarray, n_workers: int, n: int) -> np.ndarray:
    """uint8[B, >= ceil(n/8)] -> int32[n]: the sums that ``pack_levels`` wrote."""
    code = np.zeros(n, np.int32)
    for b in range(planes.shape[0]):
        code |= np.unpackbits(planes[b], count=n).astype(np.int32) << b
    return code - np.int32(n_workers)
