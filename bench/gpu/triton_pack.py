"""pack_signs in Triton: the measured alternative to numba-cuda (bench/gpu/driver.py only)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 512  # output bytes per program


@triton.jit
def _pack(x_ptr, out_ptr, n, nbytes, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK * 8 + tl.arange(0, BLOCK * 8)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    bits = tl.reshape((x > 0).to(tl.int32), (BLOCK, 8))
    weights = 128 >> tl.arange(0, 8)
    byte = tl.sum(bits * weights[None, :], axis=1)
    ob = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + ob, byte.to(tl.uint8), mask=ob < nbytes)


def triton_pack(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    _pack[(triton.cdiv(n, 8 * _BLOCK),)](x, out, n, out.numel(), BLOCK=_BLOCK)
    return out
