"""DGC's local math on each rank: clipping, momentum correction, what leaves, the SGD step."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def clip_factor(grads: Sequence[torch.Tensor], clip_norm: float | None, world_size: int) -> float:
    """Local clipping: the factor that brings this rank's L2 norm to clip_norm / sqrt(N) at most.

    If all N ranks had alike gradients, their sum would have sqrt(N) times the norm of one.
    """
    if clip_norm is None or not grads:
        return 1.0
    norms = torch.stack([torch.linalg.vector_norm(g.to(torch.float32)).cpu() for g in grads])
    total = float(torch.linalg.vector_norm(norms))
    return min(1.0, clip_norm / math.sqrt(world_size) / (total + 1e-6))


def momentum_correction(u: torch.Tensor, v: torch.Tensor, g: torch.Tensor, momentum: float) -> None:
    """u <- m u + g;  v <- v + u. Sparsifying v, not g, keeps momentum SGD's update (section 3.1)."""
    u.mul_(momentum).add_(g)
    v.add_(u)


def take_sent(u: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, masking: bool) -> torch.Tensor:
    """The sent values v[idx]; they leave v (the rest stays as residual), and u too if masking.

    Masking stops the stale momentum of a just-sent entry from pushing it on (section 3.3).
    """
    sent = v[idx]
    v[idx] = 0.0
    if masking:
        u[idx] = 0.0
    return sent


@torch.no_grad()
def momentum_sgd_apply(
    p: torch.Tensor,
    avg: torch.Tensor,
    buf: torch.Tensor,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    corrected: bool,
) -> None:
    """p <- p - lr * (buf + avg) for a compressed tensor, p <- p - lr * buf for a dense one.

    ``corrected``: avg is the average of momentum-corrected sparse velocities and already
    carries momentum, so buf only holds the weight decay (buf <- m buf + wd p, as the
    reference's DGCSGD). Otherwise avg is a plain averaged gradient: buf <- m buf + avg + wd p.
    Weight decay is never sent: parameters are the same on every rank.
    """
    local = None if corrected else avg
    if weight_decay:
        decay = p.to(torch.float32) * weight_decay
        local = decay if local is None else local + decay
    if local is not None:
        buf.mul_(momentum).add_(local)
    step = buf + avg if corrected else buf
    p.sub_((step * lr).to(p.dtype))
