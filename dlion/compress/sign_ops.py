"""Sign kernels on torch tensors, picked by device.

``CpuSignOps`` runs the Numba kernels on zero-copy NumPy views of CPU tensors.
``CudaSignOps`` runs the numba-cuda kernels (``dlion.kernels.cuda_ops``) on CUDA tensors.
``TorchSignOps`` is the same math in plain torch ops on any device; the tests hold both
to the CPU kernels.
"""

from __future__ import annotations

import numpy as np
import torch

from dlion import kernels, wire
from dlion.compress.sign import MAJORITY_TABLE, TERNARY_TABLE, average_table, combine
from dlion.kernels.common import upload

_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


_TABLES: dict[tuple[bytes, str, torch.device], torch.Tensor] = {}


def on_device(table: np.ndarray, device: torch.device) -> torch.Tensor:
    """A vote's small decode table on ``device``: uploaded once (pinned, without blocking the
    host), then the same tensor every step."""
    key = (table.tobytes(), str(table.dtype), device)
    if key not in _TABLES:
        _TABLES[key] = upload(table, device)
    return _TABLES[key]


def _flat_f32(t: torch.Tensor) -> torch.Tensor:
    """A flat float32 view of t when possible, else a float32 copy."""
    return t.detach().reshape(-1).to(torch.float32)


class CpuSignOps:
    """Numba kernels on CPU tensors."""

    def sign_step(
        self, grad: torch.Tensor, exp_avg: torch.Tensor, out: torch.Tensor, b1: float, b2: float, key: int
    ) -> None:
        # exp_avg is a contiguous float32 state tensor: its view is written in place.
        kernels.lion_sign_step(
            _flat_f32(grad).numpy(), exp_avg.view(-1).numpy(), out.numpy(), b1, b2, np.uint64(key)
        )

    def nonfinite(self, grad: torch.Tensor) -> bool:
        if grad.dtype in (torch.float32, torch.float64):
            return not kernels.all_finite(grad.detach().reshape(-1).numpy())
        return _has_nonfinite(grad)  # bf16/fp16: NumPy has no view of them

    def combine(
        self, gathered: torch.Tensor, *, vote: str, tie: str, tie_key: int, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        c = combine(gathered.numpy(), vote=vote, tie=tie, tie_key=tie_key, start=start)
        return torch.from_numpy(c.planes), torch.from_numpy(c.table)

    def apply(
        self,
        param: torch.Tensor,
        planes: torch.Tensor,
        table: torch.Tensor,
        lr: float,
        wd: float,
        cautious: bool = False,
    ) -> None:
        flat = param.detach().view(-1) if _is_plain_f32(param) else _flat_f32(param).clone()
        kernels.apply_update(flat.numpy(), planes.numpy(), table.numpy(), lr, wd, cautious)
        _write_back(param, flat)


def _has_nonfinite(t: torch.Tensor) -> bool:
    return not bool(torch.isfinite(t).all())


def _write_back(param: torch.Tensor, flat: torch.Tensor) -> None:
    """After an update of ``flat``: copy it into ``param`` unless it is a view of it."""
    if flat.data_ptr() != param.data_ptr():
        param.detach().copy_(flat.view_as(param))


def _is_plain_f32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 lanes (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _splitmix(key: int, n: int, device: torch.device) -> torch.Tensor:
    """splitmix64(key + j) for j < n, as int64 lanes: wrapping multiply, logical shifts."""

    def signed(v: int) -> int:
        v &= (1 << 64) - 1
        return v - (1 << 64) if v >= 1 << 63 else v

    s1, s2, s3 = wire.SHIFTS
    z = torch.arange(n, dtype=torch.int64, device=device) + signed(key + wire.GOLDEN)
    z = (z ^ _shr(z, s1)) * signed(wire.MIX1)
    z = (z ^ _shr(z, s2)) * signed(wire.MIX2)
    return z ^ _shr(z, s3)


def _coin_bytes(key: int, n: int, device: torch.device) -> torch.Tensor:
    """coin_bytes(key, 0, n) in torch ops: the top byte of each draw."""
    return _shr(_splitmix(key, n, device), 56).to(torch.uint8)


def stochastic_sign_step(
    grad: torch.Tensor, exp_avg: torch.Tensor, out: torch.Tensor, b1: float, b2: float, key: int
) -> None:
    """dlion-sto's worker step (dlion.kernels.stochastic) on a tensor of any device: the
    Numba kernel on the CPU, the same math in torch ops elsewhere."""
    if grad.device.type == "cpu":
        from dlion.kernels.stochastic import stochastic_sign_step as kernel

        kernel(_flat_f32(grad).numpy(), exp_avg.view(-1).numpy(), out.numpy(), b1, b2, np.uint64(key))
    else:
        stochastic_sign_step_torch(grad, exp_avg, out, b1, b2, key)


def stochastic_sign_step_torch(
    grad: torch.Tensor, exp_avg: torch.Tensor, out: torch.Tensor, b1: float, b2: float, key: int
) -> None:
    """``stochastic_sign_step`` in torch ops, for any device."""
    g, m = _flat_f32(grad), exp_avg.view(-1)
    c = m * b1 + g * (1.0 - b1)
    scale = (c.abs().sum(dtype=torch.float64) / max(1, c.numel())).to(torch.float32)
    half = torch.tensor(0.5, dtype=torch.float32, device=c.device)
    p = torch.where(scale > 0, ((c / scale).clamp(-1.0, 1.0) + 1.0) * half, half)
    r = _shr(_splitmix(key, c.numel(), c.device), 40).to(torch.float32) * 2.0**-24
    bits = _pack(r < p)
    out[: bits.numel()] = bits
    m.mul_(b2).add_(g * (1.0 - b2))


def _pack(flags: torch.Tensor) -> torch.Tensor:
    """bool[n] -> uint8[ceil(n/8)], MSB first."""
    n = flags.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=flags.device)
    padded[:n] = flags
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flags.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor) -> torch.Tensor:
    """uint8[..., nb] -> uint8[..., 8*nb] of 0/1."""
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2)


class TorchSignOps:
    """The same kernels in torch ops (any device); used for devices other than the CPU and
    CUDA (which take CpuSignOps and CudaSignOps), and by the tests as the twin of both."""

    def sign_step(
        self, grad: torch.Tensor, exp_avg: torch.Tensor, out: torch.Tensor, b1: float, b2: float, key: int
    ) -> None:
        g = _flat_f32(grad)
        m = exp_avg.view(-1)
        c = m * b1 + g * (1.0 - b1)
        bits = _pack(c > 0)
        zeros = _pack(c == 0)
        bits |= zeros & _coin_bytes(key, bits.numel(), bits.device)
        out[: bits.numel()] = bits
        m.mul_(b2).add_(g * (1.0 - b2))

    def nonfinite(self, grad: torch.Tensor) -> bool:
        return _has_nonfinite(grad)

    def combine(
        self, gathered: torch.Tensor, *, vote: str, tie: str, tie_key: int, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = gathered.shape[0]
        counts = _unpack(gathered).sum(dim=0, dtype=torch.int32)
        dev = gathered.device
        if vote == "average":
            planes = torch.stack([_pack((counts >> b) & 1 == 1) for b in range(max(1, n.bit_length()))])
            return planes, on_device(average_table(n), dev)
        win, tied = _pack(2 * counts > n), _pack(2 * counts == n)
        if n % 2 == 0 and tie == "zero":
            return torch.stack([win, tied]), on_device(TERNARY_TABLE, dev)
        if n % 2 == 0:
            win |= tied & _coin_bytes(tie_key + start, win.numel(), dev)
        return win.unsqueeze(0), on_device(MAJORITY_TABLE, dev)

    def apply(
        self,
        param: torch.Tensor,
        planes: torch.Tensor,
        table: torch.Tensor,
        lr: float,
        wd: float,
        cautious: bool = False,
    ) -> None:
        n = param.numel()
        codes = torch.zeros(n, dtype=torch.int64, device=param.device)
        for b in range(planes.shape[0]):
            codes |= _unpack(planes[b])[:n].to(torch.int64) << b
        flat = _flat_f32(param).clone()
        direction = table.to(device=flat.device, dtype=torch.float32)[codes]
        decayed = flat * (1.0 - lr * wd)
        if cautious:
            decayed = torch.where(direction * flat < 0, flat, decayed)
        flat = decayed - direction * lr
        param.detach().copy_(flat.view_as(param))


class CudaSignOps:
    """The CUDA kernels; nothing here waits for the device."""

    def sign_step(
        self, grad: torch.Tensor, exp_avg: torch.Tensor, out: torch.Tensor, b1: float, b2: float, key: int
    ) -> None:
        from dlion.kernels import cuda_ops

        cuda_ops.lion_sign_step(grad.detach().reshape(-1), exp_avg.view(-1), out, b1, b2, key)

    def nonfinite(self, grad: torch.Tensor) -> bool:
        return _has_nonfinite(grad)

    def combine(
        self, gathered: torch.Tensor, *, vote: str, tie: str, tie_key: int, start: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from dlion.kernels import cuda_ops

        n, dev = gathered.shape[0], gathered.device
        if vote == "average":
            return cuda_ops.count_planes(gathered), on_device(average_table(n), dev)
        coin = n % 2 == 0 and tie != "zero"
        win, tied = cuda_ops.majority_vote(gathered, tie_key if coin else None, start)
        if n % 2 == 0 and tie == "zero":
            return torch.stack([win, tied]), on_device(TERNARY_TABLE, dev)
        return win.unsqueeze(0), on_device(MAJORITY_TABLE, dev)

    def apply(
        self,
        param: torch.Tensor,
        planes: torch.Tensor,
        table: torch.Tensor,
        lr: float,
        wd: float,
        cautious: bool = False,
    ) -> None:
        from dlion.kernels import cuda_ops

        flat = param.detach().view(-1) if param.is_contiguous() else param.detach().reshape(-1).clone()
        cuda_ops.apply_update(flat, planes, table.to(flat.device), lr, wd, cautious)
        _write_back(param, flat)


SignOps = CpuSignOps | TorchSignOps | CudaSignOps


def ops_for(device: torch.device) -> SignOps:
    """Numba CPU kernels, the CUDA kernels, or (other devices) torch ops."""
    if device.type == "cpu":
        return CpuSignOps()
    return CudaSignOps() if device.type == "cuda" else TorchSignOps()
