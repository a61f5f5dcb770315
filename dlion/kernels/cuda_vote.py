"""CUDA twins of the vote kernels (``cpu_vote.py``): counts and majority on packed words.

One thread per 32-bit word of every row; the per-word counters are bit-sliced as on the
CPU, and the number of rows is a constant of each compiled kernel.
"""

from __future__ import annotations

import functools

import numpy as np

from dlion.kernels.cuda_device import coin, cuda, signed32


@cuda.jit(device=True, inline=True)
def _count_into(packed, w, planes, n_planes):
    # Ripple-carry add of every row's word w into bit-sliced counters (planes[b] = bit b
    # of each bit position's count of ones), as kernels.cpu._accumulate.
    for b in range(n_planes):
        planes[b] = 0
    for i in range(packed.shape[0]):
        carry = np.uint32(packed[i, w])
        for b in range(n_planes):
            t = planes[b] & carry
            planes[b] ^= carry
            carry = t


@functools.cache
def count_planes_kernel(n_planes: int):
    """packed: int32[N, W] -> out: int32[n_planes, W]. The plane count is a constant of
    the compiled kernel, so the counters unroll into registers, not local memory."""

    @cuda.jit
    def count(packed, out):
        w = cuda.grid(1)
        if w >= packed.shape[1]:
            return
        planes = cuda.local.array(n_planes, np.uint32)
        _count_into(packed, w, planes, n_planes)
        for b in range(n_planes):
            out[b, w] = signed32(planes[b])

    return count


@functools.cache
def majority_kernel(n_rows: int):
    """packed: int32[n_rows, W] (4 bucket bytes per word, little-endian) -> win, tie:
    int32[W]. win: more than N/2 ones; tie: exactly N/2 (even N). With use_coin, a tie
    takes coin byte (key, start + byte index) as its win bits, as combine_majority does."""
    n_planes = max(1, n_rows.bit_length())
    half = n_rows // 2

    @cuda.jit
    def vote(packed, win, tie, key, start, use_coin):
        w = cuda.grid(1)
        if w >= packed.shape[1]:
            return
        planes = cuda.local.array(n_planes, np.uint32)
        _count_into(packed, w, planes, n_planes)
        gt = np.uint32(0)
        eq = ~gt
        for b in range(n_planes - 1, -1, -1):
            p = planes[b]
            if (half >> b) & 1:
                eq &= p
            else:
                gt |= eq & p
                eq &= ~p
        if n_rows % 2 == 1:
            eq = np.uint32(0)
        if use_coin and eq != 0:
            coins = np.uint32(0)
            for q in range(4):
                coins |= np.uint32(coin(key, start + 4 * w + q)) << np.uint32(8 * q)
            gt |= eq & coins
        win[w] = signed32(gt)
        tie[w] = signed32(eq)

    return vote
