"""Numba CPU kernels for TernGrad; each matches its twin in ``ternary_ref.py`` bit for bit.

Wire code and random draws are specified in ``ternary_ref``: 2 bits per element, MSB first,
00 = 0, 01 = +1, 10 = -1; draw u_j = (splitmix64(key + j) >> 40) * 2^-24 (the hash of
``common.coin``, keeping 24 bits instead of 8). Float work is float32 without fastmath, so
|g| / scale rounds exactly as in NumPy. Parallel loops run over chunks of whole output
bytes, so no two threads write the same byte, and a draw depends only on (key, element):
results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dlion.kernels.common import as_key, check_1d, ready_threads, splitmix64
from dlion.kernels.ternary_ref import U24, level_bits

_S40 = np.uint64(40)
_CHUNK_BYTES = 1 << 12  # output bytes per task: 16 Ki elements of 2 bits, 32 Ki of 1 bit


@njit(inline="always")
def _uniform(key, j):  # key: uint64, j: int -> float32 in [0, 1) on a 2^-24 grid
    return np.float32(splitmix64(key, j) >> _S40) * U24


@njit(inline="always")
def _code(g, scale, key, k):  # g: float32, scale: float32 > 0 -> 2-bit code of element k
    if _uniform(key, k) < abs(g) / scale:
        return 1 if g > 0 else 2
    return 0


@njit(parallel=True, cache=True)
def _ternarize(grad, scale, key, out):  # grad: float32[n], scale: float32, out: int8[n]
    n = grad.size
    for c in prange((n + _CHUNK_BYTES - 1) // _CHUNK_BYTES):
        for k in range(c * _CHUNK_BYTES, min(n, (c + 1) * _CHUNK_BYTES)):
            code = _code(grad[k], scale, key, k) if scale > 0 else 0
            out[k] = (code & 1) - (code >> 1)


@njit(parallel=True, cache=True)
def _ternarize_pack(grad, scale, key, out):  # grad: float32[n], out: uint8[>= ceil(n/4)]
    n = grad.size
    nbytes = (n + 3) // 4
    for c in prange((nbytes + _CHUNK_BYTES - 1) // _CHUNK_BYTES):
        for j in range(c * _CHUNK_BYTES, min(nbytes, (c + 1) * _CHUNK_BYTES)):
            byte = 0
            if scale > 0:
                for q in range(min(4, n - 4 * j)):
                    byte |= _code(grad[4 * j + q], scale, key, 4 * j + q) << (6 - 2 * q)
            out[j] = np.uint8(byte)


@njit(parallel=True, cache=True)
def _pack_ternary(t, out):  # t: int8[n] in {-1, 0, 1}, out: uint8[ceil(n/4)]
    n = t.size
    for c in prange((out.size + _CHUNK_BYTES - 1) // _CHUNK_BYTES):
        for j in range(c * _CHUNK_BYTES, min(out.size, (c + 1) * _CHUNK_BYTES)):
            byte = 0
            for q in range(min(4, n - 4 * j)):
                v = t[4 * j + q]
                byte |= (1 if v > 0 else (2 if v < 0 else 0)) << (6 - 2 * q)
            out[j] = np.uint8(byte)


@njit(parallel=True, cache=True)
def _unpack_ternary(packed, out):  # packed: uint8[>= ceil(n/4)], out: int8[n]
    n = out.size
    for c in prange((n + _CHUNK_BYTES - 1) // _CHUNK_BYTES):
        for k in range(c * _CHUNK_BYTES, min(n, (c + 1) * _CHUNK_BYTES)):
            code = (packed[k >> 2] >> (6 - 2 * (k & 3))) & 3
            out[k] = np.int8(code & 1) - np.int8(code >> 1)


@njit(parallel=True, cache=True)
def _sum_ternary(packed, out):  # packed: uint8[N, nbytes], out: int32[4*nbytes] (zeroed)
    n_rows, nbytes = packed.shape
    for c in prange((nbytes + _CHUNK_BYTES - 1) // _CHUNK_BYTES):
        for j in range(c * _CHUNK_BYTES, min(nbytes, (c + 1) * _CHUNK_BYTES)):
            for i in range(n_rows):
                b = np.int32(packed[i, j])
                for q in range(4):
                    code = (b >> (6 - 2 * q)) & 3
                    out[4 * j + q] += (code & 1) - (code >> 1)


@njit(parallel=True, cache=True)
def _pack_levels(sums, offset, planes):  # sums: int32[n], planes: uint8[B, ceil(n/8)]
    n = sums.size
    n_planes, nbytes = planes.shape
    for c in prange((nbytes + _CHUNK_BYTES - 1) // _CHUNK_BYTES):
        for j in range(c * _CHUNK_BYTES, min(nbytes, (c + 1) * _CHUNK_BYTES)):
            for b in range(n_planes):
                byte = 0
                for q in range(min(8, n - 8 * j)):
                    byte |= (((sums[8 * j + q] + offset) >> b) & 1) << (7 - q)
                planes[b, j] = np.uint8(byte)


@njit(parallel=True, cache=True)
def _unpack_levels(planes, offset, out):  # planes: uint8[B, >= ceil(n/8)], out: int32[n]
    n = out.size
    for c in prange((n + _CHUNK_BYTES - 1) // _CHUNK_BYTES):
        for k in range(c * _CHUNK_BYTES, min(n, (c + 1) * _CHUNK_BYTES)):
            v = np.int32(0)
            for b in range(planes.shape[0]):
                v |= np.int32((planes[b, k >> 3] >> (7 - (k & 7))) & 1) << b
            out[k] = v - offset


def _scale(scale: float) -> np.float32:
    s = np.float32(scale)
    if not np.isfinite(s) or s < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    return s


def _check_bytes(name: str, a: np.ndarray, need: int) -> None:
    check_1d(name, a, np.uint8)
    if a.size < need:
        raise ValueError(f"{name} has {a.size} bytes; need at least {need}")


def ternarize(grad: np.ndarray, scale: float, key: int | np.integer) -> np.ndarray:
    """float32[n] -> int8[n] in {-1, 0, +1}; see ``ternarize_ref``."""
    ready_threads()
    check_1d("grad", grad, np.float32)
    out = np.empty(grad.size, np.int8)
    _ternarize(grad, _scale(scale), as_key(key), out)
    return out


def ternarize_pack(grad: np.ndarray, scale: float, key: int | np.integer, out: np.ndarray) -> None:
    """Fused draw + pack: out[:ceil(n/4)] <- pack_ternary(ternarize(grad, scale, key)).

    grad: float32[n] (any stride); out: uint8[>= ceil(n/4)], e.g. a slice of a send buffer.
    """
    ready_threads()
    check_1d("grad", grad, np.float32)
    _check_bytes("out", out, (grad.size + 3) // 4)
    _ternarize_pack(grad, _scale(scale), as_key(key), out)


def pack_ternary(t: np.ndarray) -> np.ndarray:
    """int8[n] in {-1, 0, +1} -> uint8[ceil(n/4)]; see ``pack_ternary_ref``."""
    ready_threads()
    check_1d("t", t, np.int8)
    out = np.empty((t.size + 3) // 4, np.uint8)
    _pack_ternary(t, out)
    return out


def unpack_ternary(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8[>= ceil(n/4)] -> int8[n] in {-1, 0, +1}."""
    ready_threads()
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    _check_bytes("packed", packed, (n + 3) // 4)
    out = np.empty(n, np.int8)
    _unpack_ternary(packed, out)
    return out


def sum_ternary(packed: np.ndarray) -> np.ndarray:
    """uint8[N, nbytes] of N workers' codes -> int32[4 * nbytes], summed over workers."""
    ready_threads()
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise ValueError(f"packed must be uint8[workers, bytes], got {packed.dtype}{packed.shape}")
    out = np.zeros(4 * packed.shape[1], np.int32)
    _sum_ternary(np.ascontiguousarray(packed), out)
    return out


def pack_levels(sums: np.ndarray, n_workers: int) -> np.ndarray:
    """int32[n] in [-N, N] -> uint8[B, ceil(n/8)], B = ceil(log2(2N+1)); see ``pack_levels_ref``."""
    ready_threads()
    check_1d("sums", sums, np.int32)
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    if sums.size and (int(sums.min()) < -n_workers or int(sums.max()) > n_workers):
        raise ValueError(f"sums must lie in [-{n_workers}, {n_workers}], got [{sums.min()}, {sums.max()}]")
    planes = np.empty((level_bits(n_workers), (sums.size + 7) // 8), np.uint8)
    _pack_levels(sums, np.int32(n_workers), planes)
    return planes


def unpack_levels(planes: np.ndarray, n_workers: int, n: int) -> np.ndarray:
    """uint8[B, >= ceil(n/8)] -> int32[n] of sums in [-N, N]; see ``unpack_levels_ref``."""
    ready_threads()
    b = level_bits(n_workers)
    if planes.ndim != 2 or planes.dtype != np.uint8 or planes.shape[0] != b or planes.shape[1] * 8 < n:
        raise ValueError(
            f"planes must be uint8[{b}, >= {(n + 7) // 8}] for {n_workers} workers, "
            f"got {planes.dtype}{planes.shape}"
        )
    out = np.empty(n, np.int32)
    _unpack_levels(planes, np.int32(n_workers), out)
    return out
