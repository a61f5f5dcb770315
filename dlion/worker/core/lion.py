"""The single-process reference Lion optimizer (Chen et al., 2023).

The math lives in ``lion_update``; ``Lion`` only gathers state and calls it. Each float32
operation is a separate, rounded torch op (no ``alpha=`` fused multiply-adds), so the
Numba kernels, which use the same operation order, reproduce it bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from dlion.ledger import Ledger
from dlion.worker.core.config import check_lion_hyperparameters


def run_closure(closure: Callable[[], float] | None) -> float | None:
    """The loss from ``closure`` (run with gradients enabled inside ``step``), or None."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


@torch.no_grad()
def lion_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    cautious: bool = False,
) -> None:
    """c = b1*m + (1-b1)*g;  p <- p*(1 - lr*wd) - lr*sign(c);  m <- b2*m + (1-b2)*g.

    ``cautious`` (cautious weight decay): no decay where sign(c) and p have opposite signs.
    """
    grad = grad.to(exp_avg.dtype)
    c = exp_avg * beta1 + grad * (1.0 - beta1)
    if cautious:
        keep = torch.sign(c).to(param.dtype) * param < 0
        param.copy_(torch.where(keep, param, param * (1.0 - lr * weight_decay)))
    else:
        param.mul_(1.0 - lr * weight_decay)
    param.sub_(torch.sign(c).mul_(lr).to(param.dtype))
    exp_avg.mul_(beta2).add_(grad * (1.0 - beta2))


def lion_group_update(
    items: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]], cautious: bool
) -> None:
    """``lion_update`` of each (param, grad, exp_avg, param group), with the group's lr,
    betas and weight decay."""
    for p, g, m, group in items:
        b1, b2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        lion_update(p, g, m, lr=lr, beta1=b1, beta2=b2, weight_decay=wd, cautious=cautious)


class Lion(torch.optim.Optimizer):
    """Lion on one process: ``p <- p - lr*(sign(b1*m + (1-b1)*g) + wd*p)``.

    Momentum (``state[p]["exp_avg"]``) is float32 whatever the parameter dtype.
    Parameters whose ``.grad`` is None are skipped, as in every torch optimizer. Its
    ``ledger`` stays empty (one process sends nothing), like every dlion optimizer's at N = 1.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        cautious_wd: bool = False,
    ) -> None:
        check_lion_hyperparameters(lr=lr, betas=betas, weight_decay=weight_decay)
        self.cautious_wd = bool(cautious_wd)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})
        self.ledger = Ledger(n_params=sum(p.numel() for g in self.param_groups for p in g["params"]))

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = run_closure(closure)
        live = [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p, _ in live):
            raise RuntimeError("Lion does not support sparse gradients")
        for p, _ in live:
            if not self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
        lion_group_update(((p, p.grad, self.state[p]["exp_avg"], g) for p, g in live), self.cautious_wd)
        return loss
