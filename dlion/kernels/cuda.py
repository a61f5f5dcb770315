"""CUDA twins of the Numba CPU kernels (numba-cuda), equal to them bit for bit.

Each thread owns one output byte, i.e. 8 consecutive elements: a warp's loads cover one
contiguous 1 KiB span, which on an H100 packed 2^28 float32 at 0.997x the bandwidth of
a device-to-device copy (Triton's version of the same kernel: 0.984x, with 83 us per
launch against Numba's 30 us). The bucket kernels take a *slot table* (where each tensor
starts in the bucket, and its per-tensor scalars), so a whole bucket of tensors is one
launch; the single-tensor functions in ``cuda_ops.py`` are a bucket of one slot.
The device functions they share (non-contracting float ops, bfloat16 bits, the coin, slot
search) are in ``cuda_device.py``; the vote kernels in ``cuda_vote.py``.
"""

from __future__ import annotations

import numpy as np

from dlion.kernels.cuda_device import (
    BLOCK_ELEMS,
    coin,
    cuda,
    fadd,
    fmul,
    load,
    slot_of,
    store,
    tile_slots,
)


@cuda.jit
def bucket_sign_step(grad, kind, exp_avg, out, starts, ends, betas, keys, ok, m_out):
    # grad: [8*W] (kind), exp_avg: float32[8*W], out: uint8[W]; per slot s: starts[s]
    # first byte, ends[s] = 8*starts[s] + numel, betas[s] = (b1, 1-b1, b2, 1-b2) float32,
    # keys[s] the zero-coin key (uint64 bits). Bytes past a slot's elements come out 0.
    # The new momentum goes to m_out (exp_avg itself, or a buffer committed later).
    # A block owns 8*blockDim elements: each thread loads its 8 (coalesced across the
    # block, all loads issued before any store), parks the sign flags in shared memory,
    # then packs one byte.
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    base = 8 * nt * cuda.blockIdx.x
    pos_sh = cuda.shared.array(BLOCK_ELEMS, np.uint8)
    zero_sh = cuda.shared.array(BLOCK_ELEMS, np.uint8)
    slot = cuda.local.array(8, np.int64)
    live = cuda.local.array(8, np.bool_)
    gs = cuda.local.array(8, np.float32)
    ms = cuda.local.array(8, np.float32)
    tile_slots(starts, ends, base, t, nt, 8 * out.size if ok[0] else 0, slot, live)
    for k in range(8):
        if live[k]:
            gs[k] = load(grad, kind, base + t + k * nt)
            ms[k] = exp_avg[base + t + k * nt]
    for k in range(8):
        pos, zero = 0, 0
        if live[k]:
            s, g, m = slot[k], gs[k], ms[k]
            c = fadd(fmul(betas[s, 0], m), fmul(betas[s, 1], g))
            pos = 1 if c > 0 else 0
            zero = 1 if c == 0 else 0
            m_out[base + t + k * nt] = fadd(fmul(betas[s, 2], m), fmul(betas[s, 3], g))
        pos_sh[t + k * nt] = pos
        zero_sh[t + k * nt] = zero
    cuda.syncthreads()
    j = base // 8 + t
    if j >= out.size or not ok[0]:
        return
    pos, zero = 0, 0
    for k in range(8):
        pos = (pos << 1) | pos_sh[8 * t + k]
        zero = (zero << 1) | zero_sh[8 * t + k]
    if zero != 0:
        s = slot_of(starts, j)
        pos |= zero & coin(np.uint64(keys[s]), j - starts[s])
    out[j] = pos


@cuda.jit
def bucket_commit(m, m_next, starts, ends, present, ok):
    # m <- m_next for the elements of every slot s with present[s] != 0, when ok[0]: the
    # momentum a step set aside, taken on the device once the ranks agreed on the step.
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    base = 8 * nt * cuda.blockIdx.x
    slot = cuda.local.array(8, np.int64)
    live = cuda.local.array(8, np.bool_)
    tile_slots(starts, ends, base, t, nt, m.size if ok[0] else 0, slot, live)
    for k in range(8):
        if live[k] and present[slot[k]] != 0:
            e = base + t + k * nt
            m[e] = m_next[e]


@cuda.jit
def bucket_apply(param, kind, planes, table, starts, ends, scalars, cautious, ok):
    # param: [n] (kind), updated in place; planes: uint8[B, >= ceil(n/8)]; table:
    # float32[2^B]; scalars[s] = (lr, 1 - lr*wd) float32. p <- p*decay - lr*table[code],
    # with ``cautious`` no decay where table[code] and p have opposite signs. Tiles as
    # bucket_sign_step: 8 elements per thread, loads first. Nothing is written unless ok[0].
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    base = 8 * nt * cuda.blockIdx.x
    slot = cuda.local.array(8, np.int64)
    live = cuda.local.array(8, np.bool_)
    ps = cuda.local.array(8, np.float32)
    tile_slots(starts, ends, base, t, nt, param.size if ok[0] else 0, slot, live)
    for k in range(8):
        if live[k]:
            ps[k] = load(param, kind, base + t + k * nt)
    for k in range(8):
        if live[k]:
            e, s, p = base + t + k * nt, slot[k], ps[k]
            code = 0
            for b in range(planes.shape[0]):
                code |= ((np.int32(planes[b, e // 8]) >> (7 - e % 8)) & 1) << b
            d = table[code]
            kept = p if cautious and fmul(d, p) < 0 else fmul(p, scalars[s, 1])
            store(param, kind, e, fadd(kept, -fmul(scalars[s, 0], d)))


@cuda.jit
def bucket_lion(param, pkind, grad, gkind, exp_avg, starts, ends, betas, scalars, cautious, ok):
    # Plain Lion (world size 1): p <- p*decay - lr*sign(c), sign(0) = 0; m as above.
    # One rounding to the parameter dtype (dlion.Lion rounds bf16/fp16 after each op).
    # Nothing is written unless ok[0]: the finite check is read after the launch.
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    base = 8 * nt * cuda.blockIdx.x
    slot = cuda.local.array(8, np.int64)
    live = cuda.local.array(8, np.bool_)
    gs = cuda.local.array(8, np.float32)
    ms = cuda.local.array(8, np.float32)
    ps = cuda.local.array(8, np.float32)
    tile_slots(starts, ends, base, t, nt, param.size if ok[0] else 0, slot, live)
    for k in range(8):
        if live[k]:
            e = base + t + k * nt
            gs[k] = load(grad, gkind, e)
            ms[k] = exp_avg[e]
            ps[k] = load(param, pkind, e)
    for k in range(8):
        if live[k]:
            e, s, g, m, p = base + t + k * nt, slot[k], gs[k], ms[k], ps[k]
            c = fadd(fmul(betas[s, 0], m), fmul(betas[s, 1], g))
            d = np.float32(1.0) if c > 0 else (np.float32(-1.0) if c < 0 else np.float32(0.0))
            kept = p if cautious and fmul(d, p) < 0 else fmul(p, scalars[s, 1])
            store(param, pkind, e, fadd(kept, -fmul(scalars[s, 0], d)))
            exp_avg[e] = fadd(fmul(betas[s, 2], m), fmul(betas[s, 3], g))


@cuda.jit
def pack(x, out):  # x: float32[n] -> out: uint8[ceil(n/8)], bit 1 where x > 0
    j = cuda.grid(1)
    if j >= out.size:
        return
    b = 0
    for k in range(8):
        i = 8 * j + k
        b = (b << 1) | (1 if i < x.size and x[i] > 0 else 0)
    out[j] = b


@cuda.jit
def unpack(bits, out):  # bits: uint8[>= ceil(n/8)] -> out: float32[n] of +-1
    e = cuda.grid(1)
    if e < out.size:
        out[e] = np.float32(2 * ((np.int32(bits[e // 8]) >> (7 - e % 8)) & 1) - 1)
