"""Numba CPU kernels on flat arrays; each matches its twin in ``reference.py`` bit for bit.

Argument comments give shape and dtype. Floating-point work is float32 with no fastmath,
so no FMA contraction or reassociation: results equal the NumPy references exactly.
Parallel loops run over whole output bytes (or 64-bit words), so no two threads ever
write the same byte.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dlion.kernels.common import S56, as_key, check_1d, check_sign_step, coin, ready_threads


@njit(parallel=True, cache=True)
def _coin_bytes(key, start, out):  # key: uint64, start: int, out: uint8[n]
    for j in prange(out.size):
        out[j] = coin(key, start + j)


def coin_bytes(key: int | np.integer, start: int, nbytes: int) -> np.ndarray:
    """uint8[nbytes]: byte j is the top byte of splitmix64(key + start + j)."""
    ready_threads()
    if nbytes < 0 or start < 0:
        raise ValueError(f"start and nbytes must be >= 0, got start={start}, nbytes={nbytes}")
    out = np.empty(nbytes, np.uint8)
    _coin_bytes(as_key(key), start, out)
    return out


# Chunk of elements one thread handles at a time; its scratch stays in L1/L2. Loops run
# over slices indexed from 0 so LLVM can prove indices non-negative and vectorise them.
_CHUNK = 1 << 14
_MAGIC = np.uint64(0x8040201008040201)  # gathers 8 bytes of 0/1 into one MSB-first byte
_MSB = np.uint64(1 << 63)


@njit(inline="always")
def _gather_bits(flags64, out, nbytes):
    # flags64: uint64[>= nbytes] viewing bytes of 0/1 -> out: uint8[nbytes], MSB first.
    # Little-endian: byte 0 of a word (element 8j) lands in bit 7 of the result.
    for j in range(nbytes):
        out[j] = np.uint8((flags64[j] * _MAGIC) >> S56)


@njit(inline="always")
def _chunk_bounds(c, n):
    lo = c * _CHUNK
    hi = min(n, lo + _CHUNK)
    return lo, hi, (hi - lo + 7) // 8


@njit(parallel=True, cache=True)
def _pack_signs(x, out):  # x: float32[n], out: uint8[ceil(n/8)]
    n = x.size
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi, nb = _chunk_bounds(c, n)
        flags64 = np.zeros(nb, np.uint64)
        flags = flags64.view(np.uint8)
        xs = x[lo:hi]
        for k in range(hi - lo):
            flags[k] = xs[k] > 0
        _gather_bits(flags64, out[lo // 8 : lo // 8 + nb], nb)


@njit(parallel=True, cache=True)
def _unpack_signs(bits, out):  # bits: uint8[>= ceil(n/8)], out: float32[n] <- +-1
    n = out.size
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi, nb = _chunk_bounds(c, n)
        codes64 = np.zeros(nb, np.uint64)
        _spread_row(bits, lo // 8, nb, codes64, 0)
        codes = codes64.view(np.uint8)
        os = out[lo:hi]
        for k in range(hi - lo):
            os[k] = np.float32(np.int32(codes[k]) * 2 - 1)


# Outputs are allocated by NumPy in the wrappers: large Numba (NRT) allocations fault in
# every 4 KiB page, NumPy's use huge pages.


def pack_signs(x: np.ndarray) -> np.ndarray:
    """float32[n] -> uint8[ceil(n/8)]: bit 1 where x > 0, zero-padded."""
    ready_threads()
    check_1d("x", x)
    out = np.empty((x.size + 7) // 8, np.uint8)
    _pack_signs(x, out)
    return out


def unpack_signs(bits: np.ndarray, n: int) -> np.ndarray:
    """uint8[>= ceil(n/8)] -> float32[n] of +1 (bit 1) and -1 (bit 0)."""
    ready_threads()
    check_1d("bits", bits, np.uint8)
    if not 0 <= n <= 8 * bits.size:
        raise ValueError(f"n must be in [0, {8 * bits.size}] for {bits.size} bytes, got {n}")
    out = np.empty(n, np.float32)
    _unpack_signs(bits, out)
    return out


@njit(parallel=True, cache=True)
def _lion_sign_step(grad, exp_avg, out, beta1, beta2, zero_key):
    # grad: float32[n] (any stride), exp_avg: float32[n] (updated in place),
    # out: uint8[>= ceil(n/8)] (receives the packed signs), zero_key: uint64
    n = grad.size
    b1, omb1 = np.float32(beta1), np.float32(1.0 - beta1)
    b2, omb2 = np.float32(beta2), np.float32(1.0 - beta2)
    key = zero_key
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi, nb = _chunk_bounds(c, n)
        pos64 = np.zeros(nb, np.uint64)
        zero64 = np.zeros(nb, np.uint64)
        pos = pos64.view(np.uint8)
        zero = zero64.view(np.uint8)
        gs = grad[lo:hi]
        ms = exp_avg[lo:hi]
        for k in range(hi - lo):
            g = gs[k]
            m = ms[k]
            u = b1 * m + omb1 * g
            pos[k] = u > 0
            zero[k] = u == 0
            ms[k] = b2 * m + omb2 * g
        os = out[lo // 8 : lo // 8 + nb]
        _gather_bits(pos64, os, nb)
        any_zero = np.uint64(0)
        for j in range(nb):
            any_zero |= zero64[j]
        if any_zero != 0:
            # c == 0 has no sign; a fair coin keeps such coordinates from drifting.
            for j in range(nb):
                if zero64[j] != 0:
                    zb = np.uint8((zero64[j] * _MAGIC) >> S56)
                    os[j] |= zb & coin(key, lo // 8 + j)


def _spread_table():
    # _SPREAD[b] holds the 8 bits of byte b as 8 bytes of 0/1, MSB first in memory order.
    table = np.zeros(256, np.uint64)
    for b in range(256):
        for k in range(8):
            table[b] |= np.uint64((b >> (7 - k)) & 1) << np.uint64(8 * k)
    return table


_SPREAD = _spread_table()


@njit(inline="always")
def _spread_row(row, byte0, nb, codes64, shift):
    # row: uint8[W]: ORs each element's bit (of bytes byte0 .. byte0+nb) << shift into
    # codes64, viewed as one uint8 code per element.
    rs = row[byte0 : byte0 + nb]
    s = np.uint64(shift)
    for j in range(nb):
        codes64[j] |= _SPREAD[rs[j]] << s


@njit(inline="always")
def _spread_planes(planes, byte0, nb):
    # planes: uint8[B, W] -> uint8[8*nb]: bit b of an element's code is its bit in plane b.
    codes64 = np.zeros(nb, np.uint64)
    for b in range(planes.shape[0]):
        _spread_row(planes[b], byte0, nb, codes64, b)
    return codes64.view(np.uint8)


@njit(parallel=True, cache=True)
def _apply_update(param, planes, table, lr, weight_decay, cautious):
    # param: float32[n] (updated in place), planes: uint8[B, >= ceil(n/8)],
    # table: float32[2^B]: param <- param*(1 - lr*wd) - lr*table[code]; with cautious,
    # the decay factor is 1 where table[code] and param have opposite signs.
    n = param.size
    decay = np.float32(1.0 - lr * weight_decay)
    table32 = table.astype(np.float32)
    scaled = np.float32(lr) * table32
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi, nb = _chunk_bounds(c, n)
        codes = _spread_planes(planes, lo // 8, nb)
        ps = param[lo:hi]
        for k in range(hi - lo):
            p = ps[k]
            if cautious and table32[codes[k]] * p < 0:
                ps[k] = p - scaled[codes[k]]
            else:
                ps[k] = p * decay - scaled[codes[k]]


@njit(parallel=True, cache=True)
def _any_nonfinite(x):  # x: float[n] -> number of non-finite entries
    bad = 0
    for i in prange(x.size):
        if not np.isfinite(x[i]):
            bad += 1
    return bad


def all_finite(x: np.ndarray) -> bool:
    ready_threads()
    return x.size == 0 or _any_nonfinite(x) == 0


def lion_sign_step(
    grad: np.ndarray,
    exp_avg: np.ndarray,
    out: np.ndarray,
    beta1: float,
    beta2: float,
    zero_key: int | np.integer,
) -> None:
    """Fused worker step; see ``lion_sign_step_ref``.

    grad: float32[n] (any stride); exp_avg: float32[n], updated in place;
    out: uint8[>= ceil(n/8)] receives the packed signs of c = b1*m + (1-b1)*g.
    """
    ready_threads()
    check_sign_step(grad, exp_avg, out)
    _lion_sign_step(grad, exp_avg, out, float(beta1), float(beta2), as_key(zero_key))


def apply_update(
    param: np.ndarray,
    planes: np.ndarray,
    table: np.ndarray,
    lr: float,
    weight_decay: float,
    cautious: bool = False,
) -> None:
    """param[k] <- param[k]*(1 - lr*wd) - lr*table[code_k]; see ``apply_update_ref``.

    param: float32[n], updated in place; planes: uint8[B, >= ceil(n/8)]; table: [2^B].
    """
    ready_threads()
    check_1d("param", param, np.float32)
    if planes.ndim != 2 or planes.dtype != np.uint8 or planes.shape[1] < (param.size + 7) // 8:
        raise ValueError(
            f"planes must be uint8[B, >= {(param.size + 7) // 8}], got {planes.dtype}{planes.shape}"
        )
    if not 1 <= planes.shape[0] <= 8 or table.shape != (1 << planes.shape[0],):
        raise ValueError(f"table must have 2^B entries for B = {planes.shape[0]} planes, got {table.shape}")
    _apply_update(param, planes, table, float(lr), float(weight_decay), bool(cautious))
