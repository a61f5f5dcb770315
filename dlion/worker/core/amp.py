"""Loss scaling: ``torch.amp.GradScaler`` drives a dlion optimizer as it drives torch's fused ones.

Without help, ``scaler.step(opt)`` skips ``opt.step()`` on a rank whose gradients overflowed,
while the other ranks step and wait for it in a collective: the ranks fall out of step. An
optimizer that declares ``_step_supports_amp_scaling`` is stepped on every rank instead; the
scaler sets two attributes for the length of that call:

- ``grad_scale``: the loss scale the gradients still carry, or None once ``scaler.unscale_``
  ran (before clipping, say);
- ``found_inf``: whether this rank's gradients overflowed.

The optimizer divides the gradients by the scale in place, exactly as ``unscale_`` does (the
same float32 reciprocal of the float64 scale), so "unscale_, then step" and "step" give the same
bits; and a step with an overflow on any rank is skipped on every rank, whatever ``nonfinite``
says (the step metadata already names the first non-finite gradient of every rank). Each rank's
scaler then updates its own scale from its own overflow: scales may differ between ranks, which
changes nothing the ranks share (every rank votes on its own unscaled gradient).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch


def take_loss_scale(
    optimizer: torch.optim.Optimizer, grads: Sequence[torch.Tensor | None], *, sharded: bool = False
) -> bool:
    """Whether a GradScaler drives this step; if the gradients are still scaled, unscale them.
    ``sharded``: FSDP2's parameters, refused: each rank's scaler would update its scale from its
    own shard's overflow, and FSDP's reduce-scatter would then sum gradients scaled differently."""
    if not hasattr(optimizer, "found_inf"):
        return False
    if sharded:
        raise ValueError(
            f"{type(optimizer).__name__} over FSDP-sharded parameters does not take a GradScaler: the "
            "ranks of a shard group would scale their gradients differently before FSDP sums them; "
            "train in bf16 (MixedPrecisionPolicy(param_dtype=torch.bfloat16)), which needs no scaling"
        )
    scale = getattr(optimizer, "grad_scale", None)
    if scale is not None:
        inv = scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for g in grads:
            if g is not None:
                by_device[g.device].append(g)
        for device, same in by_device.items():
            torch._foreach_mul_(same, inv.to(device))
    return True
