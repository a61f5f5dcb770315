"""The math of a round's end, on one tensor: the pseudo-gradient and error feedback.

Each is one rounded float32 torch op at a time, so the NumPy simulation in the tests
(tests/sim_local.py) reproduces it bit for bit.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def pseudo_gradient(anchor: torch.Tensor, local: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """What a rank hands the outer step as its gradient: anchor - local (the way the inner
    steps moved, negated, as a gradient points), plus the residual under error feedback."""
    q = anchor.to(torch.float32) - local.to(torch.float32)
    return q if residual is None else q + residual


@torch.no_grad()
def sign_residual(q: torch.Tensor) -> torch.Tensor:
    """Error feedback's new residual: what the scaled sign of ``q`` does not carry,
    q - mean|q| sign(q) (Karimireddy et al., 2019), with sign(0) = 0. The mean is a float64
    sum rounded once to float32, so it hardly depends on the summation order."""
    scale = (q.double().abs().sum() / max(1, q.numel())).float()
    return q - torch.sign(q) * scale
