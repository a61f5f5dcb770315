"""Device functions the CUDA kernels share: float ops that never contract into FMAs,
bfloat16 bit handling, the splitmix64 coin, and where a thread's elements lie in a bucket.

Floating point goes through fmul_rn/fadd_rn: NVVM contracts a*b + c*d into an FMA by
default (measured: 25% of results differed from NumPy's), the CPU kernels round every
operation. bfloat16 arrays arrive as int16 bit patterns (Numba has no bfloat16 array
type); float16 is native. Under NUMBA_ENABLE_CUDASIM=1 everything runs in Numba's CUDA
simulator, which is how CI tests the kernels without a GPU. numba.cuda loads with this
module, which only the CUDA paths import.
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import config

from dlion import wire


def _load_numba_cuda():  # -> the numba.cuda module
    # numba-cuda 0.68 still registers np.row_stack, which NumPy 2.5 removed. The alias is
    # added here, when the first CUDA kernel module loads, never by `import dlion`.
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack
    from numba import cuda as numba_cuda

    return numba_cuda


cuda = _load_numba_cuda()

SIMULATED = bool(config.ENABLE_CUDASIM)
THREADS = 256
BLOCK_ELEMS = 8 * THREADS  # elements per block of the sign step (8 per thread)

F32, BF16 = 0, 1  # element kinds: float32/float16 arrays, or bfloat16 bits in int16

_GOLDEN = np.uint64(wire.GOLDEN)
_M1 = np.uint64(wire.MIX1)
_M2 = np.uint64(wire.MIX2)
_S30, _S27, _S31 = (np.uint64(s) for s in wire.SHIFTS)
_S56 = np.uint64(56)

if SIMULATED:
    # The simulator runs kernels as Python on NumPy scalars: float32 ops round alike,
    # and the uint64 hash wraps as on the GPU (in the simulator's threads, so no errstate).
    warnings.filterwarnings("ignore", "overflow encountered in scalar", RuntimeWarning, __name__)

    def fmul(a, b):
        return np.float32(a) * np.float32(b)

    def fadd(a, b):
        return np.float32(a) + np.float32(b)

    def _f32_of_bits(u):
        return np.array(u, np.uint32).view(np.float32)[()]

    def _bits_of_f32(x):
        return np.array(x, np.float32).view(np.uint32)[()]

else:
    from numba.cuda import libdevice

    @cuda.jit(device=True, inline=True)
    def fmul(a, b):
        return libdevice.fmul_rn(a, b)

    @cuda.jit(device=True, inline=True)
    def fadd(a, b):
        return libdevice.fadd_rn(a, b)

    @cuda.jit(device=True, inline=True)
    def _f32_of_bits(u):
        return libdevice.int_as_float(np.int32(u))

    @cuda.jit(device=True, inline=True)
    def _bits_of_f32(x):
        return np.uint32(libdevice.float_as_int(x))


@cuda.jit(device=True, inline=True)
def signed32(u):  # the same 32 bits as int32 (torch exports no uint32 arrays)
    return np.int32(np.int64(u) - 4294967296) if u >= np.uint32(0x80000000) else np.int32(u)


@cuda.jit(device=True, inline=True)
def coin(key, j):  # the top byte of splitmix64(key + j), as kernels.common.coin
    z = key + np.uint64(j) + _GOLDEN
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    z = z ^ (z >> _S31)
    return np.uint8(z >> _S56)


@cuda.jit(device=True, inline=True)
def load(a, kind, i):
    if kind == BF16:
        return _f32_of_bits(np.uint32(np.uint16(a[i])) << np.uint32(16))
    return np.float32(a[i])


@cuda.jit(device=True, inline=True)
def store(a, kind, i, x):
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
def slot_of(starts, j):
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
def tile_slots(starts, ends, base, t, nt, n, slot, live):
    # For the thread's 8 elements e = base + t + k*nt (coalesced across the block): the
    # slot of each, and whether it lies inside that slot's elements. Most blocks lie in
    # one slot (tensors are large next to 8*blockDim elements): one search serves all.
    first = slot_of(starts, base // 8)
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
            s = slot_of(starts, e // 8)
            slot[k] = s
            live[k] = e < ends[s]
