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
def _coin_bytes(key, start, out):  # key: uint64, start: int, out: uint8[n]
    for j in prange(out.size):
        out[j] = _coin(key, start + j)


def _key(key: int | np.integer) -> np.uint64:
    # Always uint64: Numba would type a small Python int as int64 (arithmetic shifts)
    # and reject one >= 2**63 once that int64 signature exists.
    return np.uint64(int(key) & 0xFFFFFFFFFFFFFFFF)


def coin_bytes(key: int | np.integer, start: int, nbytes: int) -> np.ndarray:
    """uint8[nbytes]: byte j is the top byte of splitmix64(key + start + j)."""
    if nbytes < 0 or start < 0:
        raise ValueError(f"start and nbytes must be >= 0, got start={start}, nbytes={nbytes}")
    out = np.empty(nbytes, np.uint8)
    _coin_bytes(_key(key), start, out)
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


def _check_1d(name: str, a: np.ndarray, dtype: type | None = None) -> None:
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if dtype is not None and a.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {a.dtype}")


def pack_signs(x: np.ndarray) -> np.ndarray:
    """float32[n] -> uint8[ceil(n/8)]: bit 1 where x > 0, zero-padded."""
    _check_1d("x", x)
    out = np.empty((x.size + 7) // 8, np.uint8)
    _pack_signs(x, out)
    return out


def unpack_signs(bits: np.ndarray, n: int) -> np.ndarray:
    """uint8[>= ceil(n/8)] -> float32[n] of +1 (bit 1) and -1 (bit 0)."""
    _check_1d("bits", bits, np.uint8)
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
def _count_planes(packed, planes):  # packed: uint[N, W], planes: uint[B, W] zeroed
    n_words = packed.shape[1]
    for blk in prange((n_words + _BLOCK - 1) // _BLOCK):
        w0 = blk * _BLOCK
        _accumulate(packed, planes, w0, min(w0 + _BLOCK, n_words))


@njit(parallel=True, cache=True)
def _majority(packed, n_planes, win, tie):  # packed: uint[N, W] -> win, tie: uint[W]
    n_rows, n_words = packed.shape
    half = n_rows // 2
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
    whole = 8 * words.shape[1]
    planes = np.zeros((_n_planes(packed.shape[0]), packed.shape[1]), np.uint8)
    _count_planes(words, planes[:, :whole].view(np.uint64))
    _count_planes(tail, planes[:, whole:])
    return planes


def majority_vote(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8[N, nbytes] -> (win, tie), each uint8[nbytes]; see majority_vote_ref."""
    if packed.ndim != 2 or packed.shape[0] == 0:
        raise ValueError(f"packed must be 2-D (workers >= 1, bytes), got shape {packed.shape}")
    words, tail = _as_words(packed)
    whole = 8 * words.shape[1]
    b = _n_planes(packed.shape[0])
    win = np.empty(packed.shape[1], np.uint8)
    tie = np.empty(packed.shape[1], np.uint8)
    _majority(words, b, win[:whole].view(np.uint64), tie[:whole].view(np.uint64))
    _majority(tail, b, win[whole:], tie[whole:])
    return win, tie


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
    _check_1d("grad", grad, np.float32)
    _check_1d("exp_avg", exp_avg, np.float32)
    _check_1d("out", out, np.uint8)
    if exp_avg.size != grad.size or out.size < (grad.size + 7) // 8:
        raise ValueError(
            f"size mismatch: grad {grad.size}, exp_avg {exp_avg.size}, out {out.size} bytes "
            f"(need exp_avg == grad and out >= {(grad.size + 7) // 8})"
        )
    _lion_sign_step(grad, exp_avg, out, float(beta1), float(beta2), _key(zero_key))


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
    _check_1d("param", param, np.float32)
    if planes.ndim != 2 or planes.dtype != np.uint8 or planes.shape[1] < (param.size + 7) // 8:
        raise ValueError(
            f"planes must be uint8[B, >= {(param.size + 7) // 8}], got {planes.dtype}{planes.shape}"
        )
    if not 1 <= planes.shape[0] <= 8 or table.shape != (1 << planes.shape[0],):
        raise ValueError(f"table must have 2^B entries for B = {planes.shape[0]} planes, got {table.shape}")
    _apply_update(param, planes, table, float(lr), float(weight_decay), bool(cautious))
