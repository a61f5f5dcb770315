"""The CUDA kernels' throughput as a fraction of a device-to-device copy of the same bytes.

A kernel that reads R and writes W bytes is compared with ``copy_`` of (R + W) / 2 bytes,
timed in the same run: 1.0 means it moves its bytes as fast as the copy does. Times are
CUDA-event medians after a warm-up call (Numba's compile excluded).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dlion.compress.sign_ops import TorchSignOps
from dlion.kernels import cuda_ops

PACK_TARGET, FUSED_TARGET = 0.7, 0.7
VOTE_WORKERS = 8


@dataclass(frozen=True)
class KernelRow:
    name: str
    ms: float
    bytes_moved: int  # read + written
    copy_ms: float  # a copy_ of bytes_moved / 2 bytes
    target: float | None = None

    @property
    def of_copy(self) -> float:
        return self.copy_ms / self.ms

    @property
    def status(self) -> str:
        return "-" if self.target is None else ("PASS" if self.of_copy >= self.target else "MISS")


def cuda_ms(fn: Callable[[], object], iters: int) -> float:
    """Median milliseconds per call, CUDA events around each call, after one warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_ms(nbytes: int, iters: int) -> float:
    src = torch.empty(nbytes // 2 // 16 * 16, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return cuda_ms(lambda: dst.copy_(src), iters)


def kernel_rows(n: int, iters: int) -> list[KernelRow]:
    dev = torch.device("cuda")
    nb = n // 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, device=dev, generator=gen)
    m = torch.randn(n, device=dev, generator=gen)
    bits = cuda_ops.pack_signs(x)
    packed = torch.randint(0, 256, (VOTE_WORKERS, nb), dtype=torch.uint8, device=dev, generator=gen)
    table = torch.tensor([-1.0, 1.0], device=dev)
    slots = cuda_ops.Slots.of([0], [n], dev)
    betas = cuda_ops.betas_table([(0.9, 0.99)], dev)
    keys = cuda_ops.keys_table([7], dev)
    lrs = cuda_ops.lr_table([(1e-4, 0.1)], dev)
    x16 = x.to(torch.bfloat16)
    p = x.clone()
    planes = bits.view(1, -1)
    cases: list[tuple[str, Callable[[], object], int, float | None]] = [
        ("pack_signs (f32 -> bits)", lambda: cuda_ops.pack_signs(x), 4 * n + nb, PACK_TARGET),
        ("unpack_signs (bits -> f32)", lambda: cuda_ops.unpack_signs(bits, n), nb + 4 * n, None),
        ("fused worker step, f32 grad", lambda: cuda_ops.bucket_sign_step(x, m, bits, slots, betas, keys),
         12 * n + nb, FUSED_TARGET),
        ("fused worker step, bf16 grad", lambda: cuda_ops.bucket_sign_step(x16, m, bits, slots, betas, keys),
         10 * n + nb, FUSED_TARGET),
        (f"majority vote, N={VOTE_WORKERS}", lambda: cuda_ops.majority_vote(packed),
         (VOTE_WORKERS + 2) * nb, None),
        (f"count planes, N={VOTE_WORKERS}", lambda: cuda_ops.count_planes(packed),
         (VOTE_WORKERS + 4) * nb, None),
        ("apply update, f32 param", lambda: cuda_ops.bucket_apply(p, planes, table, slots, lrs, False),
         8 * n + nb, None),
        ("fused worker step in torch ops", lambda: TorchSignOps().sign_step(x, m, bits, 0.9, 0.99, 7),
         12 * n + nb, None),
    ]  # fmt: skip
    cases += _triton_pack(x, n)
    rows = []
    for name, fn, moved, target in cases:
        rows.append(KernelRow(name, cuda_ms(fn, iters), moved, _copy_ms(moved, iters), target))
    return rows


def _triton_pack(x: torch.Tensor, n: int) -> list[tuple[str, Callable[[], object], int, float | None]]:
    """The same pack written in Triton, the alternative to numba-cuda (not used by dlion)."""
    try:
        from bench.gpu.triton_pack import triton_pack
    except ImportError:
        return []
    out = torch.empty(n // 8, dtype=torch.uint8, device=x.device)
    if not torch.equal(triton_pack(x, out), cuda_ops.pack_signs(x)):
        raise AssertionError("the Triton pack disagrees with the numba-cuda pack")
    return [("pack_signs in Triton (alternative)", lambda: triton_pack(x, out), 4 * n + n // 8, None)]
