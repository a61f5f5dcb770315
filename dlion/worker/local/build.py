"""The two local-step optimizers of the catalogue, built from their parts.

``local_lion`` (dlion-local): inner Lion (or AdamW) without weight decay, outer DistributedLion
voting the signs of the pseudo-gradients, the decay applied once per round with the outer
step. ``diloco`` (DiLoCo, arXiv 2311.08105): inner AdamW with the weight decay, outer
Nesterov SGD on the fp32 all-reduced mean pseudo-gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch

from dlion.worker.baselines.global_opt import GlobalConfig, GlobalOptimizer
from dlion.worker.core.lion import Lion
from dlion.worker.lion.config import DistributedLionConfig
from dlion.worker.lion.distributed_lion import DistributedLion
from dlion.worker.local.config import Inner, LocalStepsConfig
from dlion.worker.local.optimizer import LocalSteps

OUTER_BETA2 = 0.99  # the outer sign momentum's own average, as Lion's
DILOCO_OUTER_LR, DILOCO_OUTER_MOMENTUM = 0.7, 0.9  # the paper's


def param_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """``params`` as a list of group dicts, so each optimizer gets copies of its own: torch.optim
    keeps the dict it is handed, and the inner and outer steps have different lrs."""
    items = list(params)
    if items and isinstance(items[0], dict):
        return [dict(g, params=list(g["params"])) for g in items]
    return [{"params": items}]


def _copies(groups: list[dict[str, Any]], **fixed: Any) -> list[dict[str, Any]]:
    return [dict(g, params=list(g["params"]), **fixed) for g in groups]


def local_lion(
    params: Iterable[Any],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    local: LocalStepsConfig,
    outer: DistributedLionConfig,
    outer_momentum: float = 0.0,
    inner: Inner = "lion",
    process_group: Any = None,
    server: Any = None,
) -> LocalSteps:
    """dlion-local: ``local.local_steps`` steps of ``inner`` on each rank, then the sign vote of
    the pseudo-gradients (``outer``: vote, backend, nonfinite, seed) at ``local.outer_lr`` times
    the inner lr; ``outer_momentum`` the outer sign momentum's beta1 (0: none)."""
    groups = param_groups(params)
    if inner == "lion":
        first: torch.optim.Optimizer = Lion(_copies(groups, weight_decay=0.0), lr=lr, betas=betas)
    else:
        first = torch.optim.AdamW(_copies(groups, weight_decay=0.0), lr=lr, betas=betas, weight_decay=0.0)
    voted = DistributedLion(
        _copies(groups, betas=(outer_momentum, OUTER_BETA2)),
        lr=lr,
        betas=(outer_momentum, OUTER_BETA2),
        weight_decay=weight_decay,
        config=outer,
        process_group=process_group,
        server=server,
    )
    return LocalSteps(first, voted, local)


def diloco(
    params: Iterable[Any],
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    local_steps: int,
    outer: GlobalConfig,
    outer_lr: float = DILOCO_OUTER_LR,
    outer_momentum: float = DILOCO_OUTER_MOMENTUM,
    outer_bits: int | None = None,
    process_group: Any = None,
) -> LocalSteps:
    """DiLoCo: inner AdamW (lr, betas, weight decay), outer SGD (``outer_lr``, Nesterov
    momentum ``outer_momentum``, no decay) on the all-reduced mean pseudo-gradient: fp32, or
    quantized to ``outer_bits`` (8 or 4; None: ``outer``'s own ``quantize_bits``) in the
    outer config's blocks (dlion.compress.quant)."""
    if outer_bits is not None:
        outer = replace(outer, quantize_bits=outer_bits)
    groups = param_groups(params)
    first = torch.optim.AdamW(_copies(groups), lr=lr, betas=betas, weight_decay=weight_decay)
    sgd = torch.optim.SGD(
        _copies(groups, weight_decay=0.0),
        lr=outer_lr,
        momentum=outer_momentum,
        nesterov=outer_momentum > 0,
    )
    config = LocalStepsConfig(local_steps=local_steps, outer_lr=outer_lr, outer_lr_unit="absolute")
    return LocalSteps(first, GlobalOptimizer(sgd, process_group, config=outer), config)
