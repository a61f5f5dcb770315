"""Bucket runners: DistributedLion's sign step and apply for one bucket's tensors, in one of
two ways, chosen once per bucket when the optimizer plans (dlion.worker.lion.plan):

- ``FlatRunner`` (dlion.worker.lion.flat): the bucket's parameters, momenta and gradients
  live in flat buffers, and each phase is one CUDA kernel over the bucket. For a bucket whose
  tensors are CUDA tensors of one dtype the kernels take, signed by plain sign.
- ``TensorRunner``: tensor by tensor, with the sign ops of the tensors' device (Numba kernels
  on the CPU, ``CudaSignOps`` on CUDA, torch ops elsewhere: ``ops_for``) and the encoder's
  sign step (plain or stochastic). Every other bucket.

Both give the same bits. Both can defer: the sign step then leaves the new momentum aside
until ``commit`` takes it for the tensors the step keeps (overlap and the DDP hook run the
sign step before the ranks agree that the step goes ahead).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from dlion.compress.buckets import Bucket
from dlion.compress.sign_ops import SignOps
from dlion.worker.core.checks import all_finite_flag, first_nonfinite
from dlion.worker.core.lion import lion_group_update
from dlion.worker.lion.encoder import SignStep

_flat_devices: tuple[str, ...] = ("cuda",)  # where a bucket may be flat: allow_flat_on
FLAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class Encoded:
    """A bucket after its sign step: the send buffer, and the runner's deferred tensors."""

    send: torch.Tensor
    keep: list[torch.Tensor]


@dataclass
class Voted:
    """A bucket after the vote: its update as planes + table; ``deferred`` when its runner
    holds new momenta for ``commit``; the tensors an overlapped launch must keep alive on
    the main stream."""

    planes: torch.Tensor
    table: torch.Tensor
    deferred: bool = False
    keep: list[torch.Tensor] = field(default_factory=list)

    def record_stream(self, stream: Any) -> None:
        for t in (self.planes, self.table, *self.keep):
            if t.is_cuda:
                t.record_stream(stream)


class Owner(Protocol):
    """What a runner reads of its optimizer's tensors, live: load_state_dict replaces the
    param groups and the state, so a runner never keeps its own copy of either."""

    state: Any

    def pairs(self, bucket: Bucket) -> list[tuple[torch.Tensor, dict[str, Any]]]: ...

    def momentum(self, index: int) -> torch.Tensor: ...  # tensor ``index``'s, made at first use

    def has_momentum(self, index: int) -> bool: ...


class Runner(Protocol):
    flat: bool  # one kernel per phase; the world-of-one step can then gate on the device

    def bind(self) -> None: ...

    def stage(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor | None: ...

    def sign_step(
        self, grads: Sequence[torch.Tensor | None], live: Sequence[bool], send: torch.Tensor,
        keys: Sequence[int], *, defer: bool,
    ) -> list[torch.Tensor]: ...  # fmt: skip

    def commit(self, present: Sequence[bool]) -> None: ...

    def apply(
        self, planes: torch.Tensor, table: torch.Tensor, present: Sequence[bool], cautious: bool
    ) -> None: ...

    def lion(self, ok: torch.Tensor, cautious: bool) -> None: ...


@runtime_checkable
class FlatRunnerLike(Protocol):
    """What a flat runner adds: the apply and commit gated by device flags."""

    def apply_gated(
        self, planes: torch.Tensor, table: torch.Tensor,
        present: torch.Tensor, cautious: bool, go: torch.Tensor,
    ) -> None: ...  # fmt: skip

    def commit_gated(self, present: torch.Tensor, go: torch.Tensor) -> None: ...


class TensorRunner:
    """One bucket, tensor by tensor."""

    flat = False

    def __init__(self, owner: Owner, bucket: Bucket, ops: SignOps, sign: SignStep) -> None:
        self.owner, self.bucket, self.ops, self.sign = owner, bucket, ops, sign
        self._pending: dict[int, torch.Tensor] = {}  # slot -> deferred momentum

    def bind(self) -> None:
        """Nothing to bind: each tensor keeps its own storage."""

    def stage(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
        return None

    def sign_step(
        self,
        grads: Sequence[torch.Tensor | None],
        live: Sequence[bool],
        send: torch.Tensor,
        keys: Sequence[int],
        *,
        defer: bool,
    ) -> list[torch.Tensor]:
        """The fused worker step of each live tensor into its bytes of ``send``; grads and
        live are the bucket's, in slot order. Returns the deferred momenta."""
        pairs = self.owner.pairs(self.bucket)
        for j, s in enumerate(self.bucket.slots):
            if not live[j]:
                continue
            (p, group), g = pairs[j], grads[j]
            if defer:  # a copy, and no state yet for a tensor the step may skip
                has = self.owner.has_momentum(s.index)
                m = self.owner.momentum(s.index).clone() if has else torch.zeros(p.shape, device=p.device)
                self._pending[j] = m
            else:
                m = self.owner.momentum(s.index)
            b1, b2 = group["betas"]
            bits = send[s.byte_offset : s.byte_offset + s.nbytes]
            self.sign(g if g is not None else torch.zeros_like(p), m, bits, b1, b2, keys[j])
        return list(self._pending.values())

    def commit(self, present: Sequence[bool]) -> None:
        for j, m in self._pending.items():
            if present[j]:
                self.owner.momentum(self.bucket.slots[j].index).copy_(m)
        self._pending = {}

    def apply(
        self, planes: torch.Tensor, table: torch.Tensor, present: Sequence[bool], cautious: bool
    ) -> None:
        for (p, group), s, on in zip(self.owner.pairs(self.bucket), self.bucket.slots, present, strict=True):
            if on:
                bits = planes[:, s.byte_offset : s.byte_offset + s.nbytes]
                self.ops.apply(p, bits, table, group["lr"], group["weight_decay"], cautious)

    def lion(self, ok: torch.Tensor, cautious: bool) -> None:
        raise RuntimeError("only a flat bucket runs Lion gated on the device")


def stage_all(
    runners: Sequence[Runner], bucket_grads: Sequence[Sequence[torch.Tensor | None]]
) -> torch.Tensor | None:
    """Bind and stage every bucket. When every bucket is flat: a device flag, every staged
    gradient finite (nothing read back). Otherwise None: the caller scans on the host."""
    staged = []
    for runner, grads in zip(runners, bucket_grads, strict=True):
        runner.bind()
        staged.append(runner.stage(grads))
    flat = [s for s in staged if s is not None]
    return all_finite_flag(flat) if flat and len(flat) == len(staged) else None


def lion_alone(
    runners: Sequence[Runner],
    bucket_grads: Sequence[Sequence[Tensor | None]],
    grads: Sequence[Tensor | None],
    tensors: Callable[[], list[tuple[Tensor, Tensor, Tensor, dict[str, Any]]]],
    cautious: bool,
) -> int:
    """Plain Lion over every bucket (a world of one); the first non-finite gradient's index,
    with nothing written, or -1. With every bucket flat and every gradient there, the finite
    check stays on the device and gates the kernels; the host reads it after every launch.
    ``tensors()``: (param, grad, momentum, group) of each tensor with a gradient."""
    ok = stage_all(runners, bucket_grads)
    if ok is not None and all(g is not None for g in grads):
        for r in runners:
            r.lion(ok, cautious)
        return -1 if bool(ok) else first_nonfinite(grads)
    bad = first_nonfinite(grads)
    if bad < 0:
        lion_group_update(tensors(), cautious)
    return bad


def allow_flat_on(*device_types: str) -> None:
    """A deliberate testing seam: the device types whose buckets may be flat (by default CUDA
    only). tests/test_flat_runner.py adds "cpu" to run FlatRunner's CUDA kernels on CPU tensors
    in Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1); the library never calls it."""
    global _flat_devices
    _flat_devices = tuple(device_types)


def can_be_flat(params: Sequence[torch.Tensor]) -> bool:
    """Whether a bucket of these tensors can be one flat buffer for the kernels."""
    first = params[0]
    return (
        first.device.type in _flat_devices
        and first.dtype in FLAT_DTYPES
        and all(p.device == first.device and p.dtype == first.dtype for p in params)
    )
