"""CUDA twins of the Numba CPU kernels (numba-cuda), equal to them bit for bit.

Each thread owns one output byte, i.e. 8 consecutive elements: a warp's loads cover one
contiguous 1 KiB span, which on an H100 packed 2^28 float32 at 0.997x the bandwidth of
a device-to-device copy (Triton's version of the same kernel: 0.984x, with 83 us per
launch against Numba's 30 us). The bucket kernels take a *slot table* (where each tensor
starts in the bucket, and its per-tensor scalars), so a whole bucket of tensors is one
launch; the single-tensor functions in ``cuda_ops.py`` are a bucket of one slot.

Floating point goes through fmul_rn/fadd_rn: NVVM contracts a*b + c*d into an FMA by
default (measured: 25% of results differed from NumPy's), the CPU kernels round every
operation. bfloat16 arrays arrive as int16 bit patterns (Numba has no bfloat16 array
type); float16 is native. Under NUMBA_ENABLE_CUDASIM=1 the kernels run in Numba's CUDA
simulator, which is how CI tests them without a GPU.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

if not hasattr(np, "row_stack"):
    # numba-cuda 0.68 still registers np.row_stack, which NumPy 2.5 removed.
    np.row_stack = np.vstack  # type: ignore[attr-defined]

from numba import config, cuda

SIMULATED = bool(config.ENABLE_CUDASIM)
THREADS = 256
_BLOCK_ELEMS = 8 * THREADS  # elements per block of the sign step (8 per thread)

F32, BF16 = 0, 1  # element kinds: float32/float16 arrays, or bfloat16 bits in int16

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S56 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(56)

if SIMULATED:
    # The simulator runs kernels as Python on NumPy scalars: float32 ops round alike,
    # and the uint64 hash wraps as on the GPU (in the simulator's threads, so no errstate).
    warnings.filterwarnings("ignore", "overflow encountered in scalar", RuntimeWarning, __name__)

    def _mul(a, b):
        return np.float32(a) * np.float32(b)

    def _add(a, b):
        return np.float32(a) + np.float32(b)

    def _f32_of_bits(u):
        return np.array(u, np.uint32).view(np.float32)[()]

    def _bits_of_f32(x):
        return np.array(x, np.float32).view(np.uint32)[()]

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def _mul(a, b):
        return libdevice.fmul_rn(a, b)

    @cuda.jit(device=True, inline=True)
    def _add(a, b):
        return libdevice.fadd_rn(a, b)

    @cuda.jit(device=True, inline=True)
    def _f32_of_bits(u):
        return libdevice.int_as_float(np.int32(u))

    @cuda.jit(device=True, inline=True)
    def _bits_of_f32(x):
        return np.uint32(libdevice.float_as_int(x))


@cuda.jit(device=True, inline=True)
def _signed32(u):  # the same 32 bits as int32 (torch exports no uint32 arrays)
    return np.int32(np.int64(u) - 4294967296) if u >= np.uint32(0x80000000) else np.int32(u)


@cuda.jit(device=True, inline=True)
def _coin(key, j):  # the top byte of splitmix64(key + j), as kernels.cpu._coin
    z = key + np.uint64(j) + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return np.uint8(z >> _S56)


@cuda.jit(device=True, inline=True)
def _load(a, kind, i):
    if kind == BF16:
        return _f32_of_bits(np.uint32(np.uint16(a[i])) << np.uint32(16))
    return np.float32(a[i])


@cuda.jit(device=True, inline=True)
def _store(a, kind, i, x):
    if kind == BF16:
        u = _bits_of_f32(x)
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
            r = 0x7FC0  # NaN, as torch rounds it
        else:  # round to nearest even, as torch's float -> bfloat16
            r = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        # int16 storage (torch exports no uint16 arrays): the same 16 bits, signed.
        a[i] = np.int16(np.int32(r) - 65536 if r >= 32768 else np.int32(r))
    else:
        a[i] = x


@cuda.jit(device=True, inline=True)
def _slot_of(starts, j):
    # The last slot whose first byte is <= j (starts is sorted, starts[0] == 0).
    lo, hi = 0, starts.size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if starts[mid] <= j:
            lo = mid
        else:
            hi = mid
    return lo


@cuda.jit(device=True, inline=True)
def _tile_slots(starts, ends, base, t, nt, n, slot, live):
    # For the thread's 8 elements e = base + t + k*nt (coalesced across the block): the
    # slot of each, and whether it lies inside that slot's elements. Most blocks lie in
    # one slot (tensors are large next to 8*blockDim elements): one search serves all.
    first = _slot_of(starts, base // 8)
    last_byte = min(base + 8 * nt, n) // 8
    if base < n and (first + 1 >= starts.size or starts[first + 1] > last_byte):
        for k in range(8):
            e = base + t + k * nt
            slot[k] = first
            live[k] = e < n and e < ends[first]
        return
    for k in range(8):
        e = base + t + k * nt
        live[k] = False
        slot[k] = 0
        if e < n:
            s = _slot_of(starts, e // 8)
            slot[k] = s
            live[k] = e < ends[s]


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
    pos_sh = cuda.shared.array(_BLOCK_ELEMS, np.uint8)
    zero_sh = cuda.shared.array(_BLOCK_ELEMS, np.uint8)
    slot = cuda.local.array(8, np.int64)
    live = cuda.local.array(8, np.bool_)
    gs = cuda.local.array(8, np.float32)
    ms = cuda.local.array(8, np.float32)
    _tile_slots(starts, ends, base, t, nt, 8 * out.size if ok[0] else 0, slot, live)
    for k in range(8):
        if live[k]:
            gs[k] = _load(grad, kind, base + t + k * nt)
            ms[k] = exp_avg[base + t + k * nt]
    for k in range(8):
        pos, zero = 0, 0
        if live[k]:
            s, g, m = slot[k], gs[k], ms[k]
            c = _add(_mul(betas[s, 0], m), _mul(betas[s, 1], g))
            pos = 1 if c > 0 else 0
            zero = 1 if c == 0 else 0
            m_out[base + t + k * nt] = _add(_mul(betas[s, 2], m), _mul(betas[s, 3], g))
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
        s = _slot_of(starts, j)
        pos |= zero & _coin(np.uint64(keys[s]), j - starts[s])
    out[j] = pos


@cuda.jit
def bucket_apply(param, kind, planes, table, starts, ends, scalars, cautious):
    # param: [n] (kind), updated in place; planes: uint8[B, >= ceil(n/8)]; table:
    # float32[2^B]; scalars[s] = (lr, 1 - lr*wd) float32. p <- p*decay - lr*table[code],
    # with ``cautious`` no decay where table[code] and p have opposite signs. Tiles as
    # bucket_sign_step: 8 elements per thread, loads first.
    t, nt = cuda.threadIdx.x, cuda.blockDim.x
    base = 8 * nt * cuda.blockIdx.x
    slot = cuda.local.array(8, np.int64)
    live = cuda.local.array(8, np.bool_)
    ps = cuda.local.array(8, np.float32)
    _tile_slots(starts, ends, base, t, nt, param.size, slot, live)
    for k in range(8):
        if live[k]:
            ps[k] = _load(param, kind, base + t + k * nt)
    for k in range(8):
        if live[k]:
            e, s, p = base + t + k * nt, slot[k], ps[k]
            code = 0
            for b in range(planes.shape[0]):
                code |= ((np.int32(planes[b, e // 8]) >> (7 - e % 8)) & 1) << b
            d = table[code]
            kept = p if cautious and _mul(d, p) < 0 else _mul(p, scalars[s, 1])
            _store(param, kind, e, _add(kept, -_mul(scalars[s, 0], d)))


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
    _tile_slots(starts, ends, base, t, nt, param.size if ok[0] else 0, slot, live)
    for k in range(8):
        if live[k]:
            e = base + t + k * nt
            gs[k] = _load(grad, gkind, e)
            ms[k] = exp_avg[e]
            ps[k] = _load(param, pkind, e)
    for k in range(8):
        if live[k]:
            e, s, g, m, p = base + t + k * nt, slot[k], gs[k], ms[k], ps[k]
            c = _add(_mul(betas[s, 0], m), _mul(betas[s, 1], g))
            d = np.float32(1.0) if c > 0 else (np.float32(-1.0) if c < 0 else np.float32(0.0))
            kept = p if cautious and _mul(d, p) < 0 else _mul(p, scalars[s, 1])
            _store(param, pkind, e, _add(kept, -_mul(scalars[s, 0], d)))
            exp_avg[e] = _add(_mul(betas[s, 2], m), _mul(betas[s, 3], g))


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
            out[b, w] = _signed32(planes[b])

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
                coins |= np.uint32(_coin(key, start + 4 * w + q)) << np.uint32(8 * q)
            gt |= eq & coins
        win[w] = _signed32(gt)
        tie[w] = _signed32(eq)

    return vote
