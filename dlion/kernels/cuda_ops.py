"""The CUDA kernels on torch tensors: the CPU kernels' signatures, plus whole buckets.

Tensors stay on the device and kernels run on torch's current stream: nothing here
synchronises with the host. Per-slot scalars (betas, lr, keys) travel to the device
through pinned memory without blocking. Under Numba's CUDA simulator the same functions
take CPU tensors (tests/test_cuda_kernels.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dlion.kernels import cuda as k
from dlion.kernels import cuda_vote
from dlion.kernels.common import as_key, upload
from dlion.kernels.cuda_device import BF16, F32, SIMULATED, THREADS
from dlion.kernels.cuda_device import cuda as nb_cuda

KINDS = {torch.float32: F32, torch.float16: F32, torch.bfloat16: BF16}
_THREADS = 64 if SIMULATED else THREADS
_streams: dict[int, object] = {}
_wrapped: dict[tuple[object, ...], object] = {}
_WRAPPED_MAX = 4096


def _arr(t: torch.Tensor):  # -> a Numba device array (a NumPy view in the simulator)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if SIMULATED:
        return t.numpy()
    # Wrapping costs ~20 us; a step passes the same buffers every time. The wrapper holds
    # no reference (owner=None) and describes only (address, shape, strides, dtype), so a
    # cached one stays right even after the memory is freed and handed out again.
    key = (t.data_ptr(), t.shape, t.stride(), t.dtype)
    arr = _wrapped.get(key)
    if arr is None:
        if len(_wrapped) >= _WRAPPED_MAX:
            _wrapped.clear()
        desc = t.__cuda_array_interface__
        arr = _wrapped[key] = nb_cuda.from_cuda_array_interface(desc, owner=None, sync=False)
    return arr


def _stream():
    if SIMULATED:
        return 0
    ptr = torch.cuda.current_stream().cuda_stream
    if ptr not in _streams:
        _streams[ptr] = nb_cuda.external_stream(ptr)
    return _streams[ptr]


def _launch(kernel, n_threads: int, *args) -> None:
    if n_threads == 0:
        return
    blocks = -(-n_threads // _THREADS)
    with np.errstate(over="ignore"):  # the simulator's uint64 hash wraps, as on the GPU
        kernel[blocks, _THREADS, _stream()](*args)


def _kind(t: torch.Tensor, name: str) -> int:
    if t.dtype not in KINDS:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be 1-D and contiguous, got shape {tuple(t.shape)}")
    return KINDS[t.dtype]


@dataclass(frozen=True)
class Slots:
    """Where each tensor of a bucket lies: first byte, element end (8*start + numel)."""

    starts: torch.Tensor  # int64[S], sorted, starts[0] == 0
    ends: torch.Tensor  # int64[S]

    @staticmethod
    def of(byte_offsets: Sequence[int], numels: Sequence[int], device: torch.device) -> Slots:
        starts = np.asarray(byte_offsets, np.int64)
        if starts.size == 0 or starts[0] != 0 or (np.diff(starts) < 0).any():
            raise ValueError(f"slot byte offsets must start at 0 and be sorted, got {list(byte_offsets)}")
        ends = 8 * starts + np.asarray(numels, np.int64)
        return Slots(upload(starts, device), upload(ends, device))


def betas_table(betas: Sequence[tuple[float, float]], device: torch.device) -> torch.Tensor:
    """float32[S, 4]: (b1, 1-b1, b2, 1-b2), rounded as the CPU kernel rounds them."""
    rows = [(b1, 1.0 - b1, b2, 1.0 - b2) for b1, b2 in betas]
    return upload(np.asarray(rows, np.float64).astype(np.float32).reshape(-1, 4), device)


def lr_table(lr_wd: Sequence[tuple[float, float]], device: torch.device) -> torch.Tensor:
    """float32[S, 2]: (lr, 1 - lr*wd), rounded as the CPU kernel rounds them."""
    rows = [(lr, 1.0 - lr * wd) for lr, wd in lr_wd]
    return upload(np.asarray(rows, np.float64).astype(np.float32).reshape(-1, 2), device)


def keys_table(keys: Sequence[int], device: torch.device) -> torch.Tensor:
    """int64[S] holding each uint64 key's bits."""
    return upload(np.array([as_key(x) for x in keys], np.uint64).view(np.int64), device)


def bucket_sign_step(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    out: torch.Tensor,
    slots: Slots,
    betas: torch.Tensor,
    keys: torch.Tensor,
    ok: torch.Tensor | None = None,
    m_out: torch.Tensor | None = None,
) -> None:
    """Fused worker step over a flat bucket: out <- signs of c; the new momentum goes to
    ``m_out`` (default: exp_avg, in place)."""
    kind = _kind(grad, "grad")
    if exp_avg.dtype != torch.float32 or exp_avg.numel() != grad.numel() or 8 * out.numel() < grad.numel():
        raise ValueError(
            f"need float32 exp_avg of {grad.numel()} and >= {-(-grad.numel() // 8)} out bytes, "
            f"got {exp_avg.dtype}[{exp_avg.numel()}] and {out.numel()}"
        )
    args = (_arr(grad), kind, _arr(exp_avg), _arr(out), _arr(slots.starts), _arr(slots.ends))
    m_next = _arr(m_out if m_out is not None else exp_avg)
    _launch(
        k.bucket_sign_step, out.numel(), *args, _arr(betas), _arr(keys), _arr(_ok(ok, grad.device)), m_next
    )


def bucket_apply(
    param: torch.Tensor,
    planes: torch.Tensor,
    table: torch.Tensor,
    slots: Slots,
    lrs: torch.Tensor,
    cautious: bool,
    ok: torch.Tensor | None = None,
) -> None:
    """p <- p*(1 - lr*wd) - lr*table[code] over a flat bucket, per-slot lr and wd; with
    ``ok`` (a device flag), nothing is written unless ok[0]."""
    kind = _kind(param, "param")
    _check_planes(planes, table, param.numel())
    args = (_arr(param), kind, _arr(planes), _arr(table.to(torch.float32)), _arr(slots.starts))
    tail = (_arr(slots.ends), _arr(lrs), bool(cautious), _arr(_ok(ok, param.device)))
    _launch(k.bucket_apply, -(-param.numel() // 8), *args, *tail)


def bucket_commit(
    exp_avg: torch.Tensor, m_next: torch.Tensor, slots: Slots, present: torch.Tensor, ok: torch.Tensor
) -> None:
    """exp_avg <- m_next in the slots where ``present`` (a device uint8[S]), when ``ok``."""
    if exp_avg.dtype != torch.float32 or m_next.dtype != torch.float32 or exp_avg.shape != m_next.shape:
        raise ValueError(f"need two float32 buffers of one shape, got {exp_avg.dtype}, {m_next.dtype}")
    args = (_arr(exp_avg), _arr(m_next), _arr(slots.starts), _arr(slots.ends), _arr(present.to(torch.uint8)))
    _launch(k.bucket_commit, -(-exp_avg.numel() // 8), *args, _arr(_ok(ok, exp_avg.device)))


def bucket_lion(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    slots: Slots,
    betas: torch.Tensor,
    lrs: torch.Tensor,
    cautious: bool = False,
    ok: torch.Tensor | None = None,
) -> None:
    """Plain Lion over a flat bucket (world size 1): sign(0) = 0, no coin. With ``ok``
    (a device bool[1]), nothing is written unless ok[0]: a finite check need not be read
    before the launch."""
    pk, gk = _kind(param, "param"), _kind(grad, "grad")
    args = (_arr(param), pk, _arr(grad), gk, _arr(exp_avg), _arr(slots.starts), _arr(slots.ends))
    tail = (_arr(betas), _arr(lrs), bool(cautious), _arr(_ok(ok, param.device)))
    _launch(k.bucket_lion, -(-param.numel() // 8), *args, *tail)


_TRUE: dict[torch.device, torch.Tensor] = {}


def _ok(ok: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if ok is not None:
        return ok.reshape(1).to(torch.uint8)
    if device not in _TRUE:
        _TRUE[device] = torch.ones(1, dtype=torch.uint8, device=device)
    return _TRUE[device]


def _check_planes(planes: torch.Tensor, table: torch.Tensor, n: int) -> None:
    if planes.dim() != 2 or planes.dtype != torch.uint8 or 8 * planes.shape[1] < n:
        raise ValueError(f"planes must be uint8[B, >= {-(-n // 8)}], got {planes.dtype}{tuple(planes.shape)}")
    if not 1 <= planes.shape[0] <= 8 or tuple(table.shape) != (1 << planes.shape[0],):
        raise ValueError(
            f"table must have 2^B entries for B = {planes.shape[0]} planes, got {tuple(table.shape)}"
        )


def _one_slot(n: int, device: torch.device) -> Slots:
    return Slots.of([0], [n], device)


# The CPU kernels' signatures (dlion.kernels.cpu), on device tensors.


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """float32[n] -> uint8[ceil(n/8)]: bit 1 where x > 0, zero-padded."""
    out = torch.empty(-(-x.numel() // 8), dtype=torch.uint8, device=x.device)
    _launch(k.pack, out.numel(), _arr(x.reshape(-1).to(torch.float32)), _arr(out))
    return out


def unpack_signs(bits: torch.Tensor, n: int) -> torch.Tensor:
    """uint8[>= ceil(n/8)] -> float32[n] of +1 (bit 1) and -1 (bit 0)."""
    if not 0 <= n <= 8 * bits.numel():
        raise ValueError(f"n must be in [0, {8 * bits.numel()}] for {bits.numel()} bytes, got {n}")
    out = torch.empty(n, dtype=torch.float32, device=bits.device)
    _launch(k.unpack, n, _arr(bits), _arr(out))
    return out


def lion_sign_step(
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    out: torch.Tensor,
    beta1: float,
    beta2: float,
    zero_key: int,
) -> None:
    """Fused worker step on one tensor; see ``kernels.lion_sign_step_ref``."""
    dev = grad.device
    nb = -(-grad.numel() // 8)
    send = out[:nb] if out.numel() >= nb else out
    table = (_one_slot(grad.numel(), dev), betas_table([(beta1, beta2)], dev), keys_table([zero_key], dev))
    bucket_sign_step(grad.reshape(-1), exp_avg.view(-1), send, *table)


def apply_update(
    param: torch.Tensor,
    planes: torch.Tensor,
    table: torch.Tensor,
    lr: float,
    weight_decay: float,
    cautious: bool = False,
) -> None:
    """param <- param*(1 - lr*wd) - lr*table[code], in place; see ``apply_update_ref``."""
    dev = param.device
    bucket_apply(
        param.view(-1),
        planes,
        table,
        _one_slot(param.numel(), dev),
        lr_table([(lr, weight_decay)], dev),
        cautious,
    )


def _words(packed: torch.Tensor) -> torch.Tensor:
    """uint8[N, nbytes] -> int32[N, ceil(nbytes/4)] (zero-padded to whole words)."""
    n, nb = packed.shape
    if nb % 4:
        packed = torch.cat([packed, packed.new_zeros(n, 4 - nb % 4)], dim=1)
    return packed.contiguous().view(torch.int32)


def _n_planes(n_workers: int) -> int:
    return max(1, int(n_workers).bit_length())


def count_planes(packed: torch.Tensor) -> torch.Tensor:
    """uint8[N, nbytes] -> uint8[B, nbytes], B = ceil(log2(N+1)); see count_planes_ref."""
    if packed.dim() != 2 or packed.shape[0] == 0:
        raise ValueError(f"packed must be 2-D (workers >= 1, bytes), got shape {tuple(packed.shape)}")
    words = _words(packed)
    out = torch.empty(_n_planes(packed.shape[0]), words.shape[1], dtype=torch.int32, device=packed.device)
    _launch(cuda_vote.count_planes_kernel(out.shape[0]), words.shape[1], _arr(words), _arr(out))
    return out.view(torch.uint8)[:, : packed.shape[1]]


def majority_vote(
    packed: torch.Tensor, tie_key: int | None = None, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8[N, nbytes] -> (win, tie), uint8[nbytes] each; see majority_vote_ref.

    With ``tie_key``, even splits are already resolved in ``win`` by the tie coin of
    ``compress.sign.combine_majority`` (bucket byte ``start + j``).
    """
    if packed.dim() != 2 or packed.shape[0] == 0:
        raise ValueError(f"packed must be 2-D (workers >= 1, bytes), got shape {tuple(packed.shape)}")
    words = _words(packed)
    win, tie = (torch.empty(words.shape[1], dtype=torch.int32, device=packed.device) for _ in range(2))
    key = as_key(tie_key if tie_key is not None else 0)
    vote = cuda_vote.majority_kernel(packed.shape[0])
    _launch(vote, words.shape[1], _arr(words), _arr(win), _arr(tie), key, start, tie_key is not None)
    nb = packed.shape[1]
    return win.view(torch.uint8)[:nb], tie.view(torch.uint8)[:nb]
