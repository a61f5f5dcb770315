"""Numba CPU kernels on flat arrays; each matches its twin in ``reference.py`` bit for bit.

Argument comments give shape and dtype. Floating-point work is float32 with no fastmath,
so no FMA contraction or reassociation: results equal the NumPy references exactly.
Parallel loops run over whole output bytes (or 64-bit words), so no two threads ever
write the same byte.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S56 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(56)
_BLOCK = 256  # words per block in the bit-sliced counter: planes stay in L1


@njit(inline="always")
def _coin(key, j):  # key: uint64, j: int -> uint8, the top byte of splitmix64(key + j)
    z = key + np.uint64(j) + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return np.uint8(z >> _S56)


@njit(parallel=True, cache=True)
def coin_bytes(key, start, nbytes):  # key: uint64, start/nbytes: int -> uint8[nbytes]
    out = np.empty(nbytes, np.uint8)
    for j in prange(nbytes):
        out[j] = _coin(key, start + j)
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
        out[j] = np.uint8((flags64[j] * _MAGIC) >> _S56)


@njit(inline="always")
def _chunk_bounds(c, n):
    lo = c * _CHUNK
    hi = min(n, lo + _CHUNK)
    return lo, hi, (hi - lo + 7) // 8


@njit(parallel=True, cache=True)
def pack_signs(x):  # x: float32[n] -> uint8[ceil(n/8)]
    n = x.size
    out = np.empty((n + 7) // 8, np.uint8)
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi, nb = _chunk_bounds(c, n)
        flags64 = np.zeros(nb, np.uint64)
        flags = flags64.view(np.uint8)
        xs = x[lo:hi]
        for k in range(hi - lo):
            flags[k] = xs[k] > 0
        _gather_bits(flags64, out[lo // 8 : lo // 8 + nb], nb)
    return out


@njit(parallel=True, cache=True)
def unpack_signs(bits, n):  # bits: uint8[>= ceil(n/8)], n: int -> float32[n] of +-1
    out = np.empty(n, np.float32)
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi, nb = _chunk_bounds(c, n)
        codes64 = np.zeros(nb, np.uint64)
        _spread_row(bits, lo // 8, nb, codes64, 0)
        codes = codes64.view(np.uint8)
        os = out[lo:hi]
        for k in range(hi - lo):
            os[k] = np.float32(np.int32(codes[k]) * 2 - 1)
    return out


@njit(parallel=True, cache=True)
def lion_sign_step(grad, exp_avg, out, beta1, beta2, zero_key):
    # grad: float32[n] (any stride), exp_avg: float32[n] (updated in place),
    # out: uint8[>= ceil(n/8)] (receives the packed signs), zero_key: uint64
    n = grad.size
    b1, omb1 = np.float32(beta1), np.float32(1.0 - beta1)
    b2, omb2 = np.float32(beta2), np.float32(1.0 - beta2)
    key = np.uint64(zero_key)
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
                    zb = np.uint8((zero64[j] * _MAGIC) >> _S56)
                    os[j] |= zb & _coin(key, lo // 8 + j)


@njit(cache=True)
def _accumulate(packed, planes, w0, w1):
    # packed: uint[N, W], planes: uint[B, W] zeroed on [w0, w1): ripple-carry add of
    # each row into the bit-sliced counters. Row i can only reach plane bit_length(i+1).
    n_rows = packed.shape[0]
    for i in range(n_rows):
        top = 0
        while (i + 1) >> top:
            top += 1
        top = min(top, planes.shape[0])
        for w in range(w0, w1):
            carry = packed[i, w]
            for b in range(top):
                t = planes[b, w] & carry
                planes[b, w] ^= carry
                carry = t


@njit(parallel=True, cache=True)
def _count_planes(packed, n_planes):  # packed: uint[N, W] -> uint[B, W]
    n_words = packed.shape[1]
    planes = np.zeros((n_planes, n_words), packed.dtype)
    for blk in prange((n_words + _BLOCK - 1) // _BLOCK):
        w0 = blk * _BLOCK
        _accumulate(packed, planes, w0, min(w0 + _BLOCK, n_words))
    return planes


@njit(parallel=True, cache=True)
def _majority(packed, n_planes):  # packed: uint[N, W] -> (win, tie): uint[W] each
    n_rows, n_words = packed.shape
    half = n_rows // 2
    win = np.empty(n_words, packed.dtype)
    tie = np.empty(n_words, packed.dtype)
    for blk in prange((n_words + _BLOCK - 1) // _BLOCK):
        w0 = blk * _BLOCK
        w1 = min(w0 + _BLOCK, n_words)
        planes = np.zeros((n_planes, w1 - w0), packed.dtype)
        _accumulate(packed[:, w0:w1], planes, 0, w1 - w0)
        for w in range(w1 - w0):
            # Bit-sliced compare of each count against half, most significant first.
            gt = packed.dtype.type(0)
            eq = ~gt
            for b in range(n_planes - 1, -1, -1):
                p = planes[b, w]
                if (half >> b) & 1:
                    eq &= p
                else:
                    gt |= eq & p
                    eq &= ~p
            win[w0 + w] = gt
            tie[w0 + w] = eq if n_rows % 2 == 0 else packed.dtype.type(0)
    return win, tie


def _as_words(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split uint8[N, nbytes] into a uint64 view of whole words and a uint8 tail."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    whole = packed.shape[1] // 8 * 8
    return packed[:, :whole].view(np.uint64), np.ascontiguousarray(packed[:, whole:])


def _n_planes(n_workers: int) -> int:
    return max(1, int(n_workers).bit_length())


def count_planes(packed: np.ndarray) -> np.ndarray:
    """uint8[N, nbytes] -> uint8[B, nbytes], B = ceil(log2(N+1)); see count_planes_ref."""
    if packed.ndim != 2:
        raise ValueError(f"packed must be 2-D (workers, bytes), got shape {packed.shape}")
    words, tail = _as_words(packed)
    b = _n_planes(packed.shape[0])
    return np.concatenate([_count_planes(words, b).view(np.uint8), _count_planes(tail, b)], axis=1)


def majority_vote(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8[N, nbytes] -> (win, tie), each uint8[nbytes]; see majority_vote_ref."""
    if packed.ndim != 2 or packed.shape[0] == 0:
        raise ValueError(f"packed must be 2-D (workers >= 1, bytes), got shape {packed.shape}")
    words, tail = _as_words(packed)
    b = _n_planes(packed.shape[0])
    win_w, tie_w = _majority(words, b)
    win_t, tie_t = _majority(tail, b)
    return (
        np.concatenate([win_w.view(np.uint8), win_t]),
        np.concatenate([tie_w.view(np.uint8), tie_t]),
    )


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
def apply_update(param, planes, table, lr, weight_decay):
    # param: float32[n] (updated in place), planes: uint8[B, >= ceil(n/8)],
    # table: float32[2^B]: param <- param*(1 - lr*wd) - lr*table[code]
    n = param.size
    decay = np.float32(1.0 - lr * weight_decay)
    scaled = np.float32(lr) * table.astype(np.float32)
    for c in prange((n + _CHUNK - 1) // _CHUNK):
        lo, hi, nb = _chunk_bounds(c, n)
        codes = _spread_planes(planes, lo // 8, nb)
        ps = param[lo:hi]
        for k in range(hi - lo):
            ps[k] = ps[k] * decay - scaled[codes[k]]


@njit(parallel=True, cache=True)
def _any_nonfinite(x):  # x: float[n] -> number of non-finite entries
    bad = 0
    for i in prange(x.size):
        if not np.isfinite(x[i]):
            bad += 1
    return bad


def all_finite(x: np.ndarray) -> bool:
    return x.size == 0 or _any_nonfinite(x) == 0
