"""Optimizers whose apply is a torch optimizer's step on the averaged gradients."""

from __future__ import annotations

from typing import Any

import torch

from dlion.worker.core.base import CommOptimizer, W
from dlion.worker.core.config import CommConfig
from dlion.worker.core.saved_state import load_keeping_dtypes


class InnerStep(CommOptimizer[W]):
    """A CommOptimizer whose apply is a torch optimizer's step on the averaged gradients
    (TernGrad's SGD, the fp32 baseline's AdamW or Lion). The two share their param groups and
    state, so an LR scheduler, a state_dict or a load reaches both alike."""

    def __init__(self, inner: torch.optim.Optimizer, *, config: CommConfig, process_group: Any) -> None:
        super().__init__(inner.param_groups, inner.defaults, config=config, process_group=process_group)
        self.inner = inner
        self.param_groups = inner.param_groups  # one list: what one holds, the other does
        self.state = inner.state

    def _finish(self, work: W) -> None:
        self.inner.step()

    def _set_grad(self, i: int, mean: torch.Tensor) -> None:
        """Tensor i's gradient becomes ``mean`` (any shape of its numel), for the inner step."""
        p = self._flat[i][0]
        g = mean.reshape(p.shape).to(p.device, p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The inner optimizer's own load (AdamW's defaults, its step tensors), then share again.
        load_keeping_dtypes(self.inner.load_state_dict, self.inner, self._restore_counters(state_dict))
        self.param_groups, self.state = self.inner.param_groups, self.inner.state
        self._regroup()
