"""Numba CPU kernels of the vote on packed signs: majority and counts, bit-sliced.

Each matches its twin in ``reference.py`` bit for bit. The rows of N workers are added
into bit-sliced counters (plane b holds bit b of every element's count) a block of
64-bit words at a time, so the counters stay in L1; no two threads write the same word.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from dlion.kernels.common import ready_threads

_BLOCK = 256  # words per block in the bit-sliced counter: planes stay in L1


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
    ready_threads()
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
    ready_threads()
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
