"""Optimizer state helpers every communicating optimizer shares."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def params_with_groups(param_groups: Sequence[dict[str, Any]]) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Each parameter beside its param group, in order. torch.optim's load_state_dict
    replaces the group dicts, so these pairs are taken again after loading, or an LR
    scheduler would change groups the optimizer no longer reads."""
    return [(p, g) for g in param_groups for p in g["params"]]


def fp32_state(state: Any, p: torch.Tensor, name: str) -> torch.Tensor:
    """state[p][name], made as zeros at first use; float32 and contiguous whatever the
    parameter (torch's load_state_dict casts state to the parameter dtype)."""
    st = state[p]
    buf = st.get(name)
    if buf is None:
        buf = st[name] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    elif buf.dtype != torch.float32 or not buf.is_contiguous():
        buf = st[name] = buf.to(torch.float32).contiguous()
    return buf
