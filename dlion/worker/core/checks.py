"""Local checks of gradients, the same for every optimizer: dense floating point, and finite."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dlion.compress.sign_ops import ops_for


class NonFiniteGradientError(FloatingPointError):
    """A rank produced a NaN or Inf gradient; raised on every rank."""


class GradientChangedError(RuntimeError):
    """A gradient changed between the end of backward and step() (clipped, unscaled, replaced)
    after its vote had begun during backward: the vote would ignore the change. Raised on every
    rank, before anything is applied."""

    def __init__(self, rank: int, name: str, step: int) -> None:
        super().__init__(
            f"the gradient of {name} on rank {rank} changed after its vote began during backward "
            f"(step {step}): something between backward and step() modified or replaced it (gradient "
            "clipping, GradScaler.unscale_, a hook), and the vote would not see it. Under dlion.attach, "
            "pass dlion.attach(model, optimizer, vote_in_step=True) to run the vote in step(), after such "
            "changes (the default, vote_in_step=None, learns this at the first step when the change "
            "happens there too); with overlap=True, use overlap=False"
        )
        self.rank, self.name, self.step = rank, name, step


def raise_nonfinite(policy: str, *, where: str, step: int) -> None:
    """Raise under nonfinite="raise"; under "skip" return, and the caller skips the step."""
    if policy == "raise":
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) on {where} at step {step}; "
            "pass nonfinite='skip' to skip such steps on all ranks"
        )


def dense_float_grads(
    owner: str, params: Sequence[torch.Tensor], names: Sequence[str]
) -> list[torch.Tensor | None]:
    """Each p.grad (None where there is none); a sparse or non-floating gradient is a
    TypeError naming the tensor."""
    grads = [p.grad for p in params]
    for g, name in zip(grads, names, strict=True):
        if g is not None and g.is_sparse:
            raise TypeError(f"{owner} does not support sparse gradients ({name})")
        if g is not None and not g.is_floating_point():
            raise TypeError(f"gradient of {name} is {g.dtype}; expected a floating-point dtype")
    return grads


def all_finite_flag(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A device bool[1]: every element of every tensor finite (one fused max-norm over the
    list; nothing is read back)."""
    norms = torch._foreach_norm(list(tensors), float("inf"))
    return torch.isfinite(torch.stack([n.float() for n in norms])).all().reshape(1)


def first_nonfinite(grads: Sequence[torch.Tensor | None]) -> int:
    """Index of the first gradient holding a NaN or Inf, or -1 (one pass over each, by the
    Numba kernel for float32/float64 CPU tensors)."""
    on_gpu = [g for g in grads if g is not None and g.is_cuda]
    if on_gpu and bool(all_finite_flag(on_gpu)):
        # One fused max-norm over every CUDA gradient, one host read per step; the
        # tensor-by-tensor scan below runs only to name a bad one.
        grads = [None if g is not None and g.is_cuda else g for g in grads]
    return next((i for i, g in enumerate(grads) if g is not None and ops_for(g.device).nonfinite(g)), -1)
