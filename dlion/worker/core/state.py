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


def tensor_names(owner: str, param_groups: Sequence[dict[str, Any]]) -> list[str]:
    """How errors name each tensor, in order (its name when the param groups carry names). A
    parameter that is not floating point is a TypeError; one listed twice a ValueError (torch.optim
    only warns, and it would be updated, sent and counted twice)."""
    names: list[str] = []
    first: dict[int, int] = {}  # id(p) -> where it was first listed
    for group in param_groups:
        given = group.get("param_names")
        for j, p in enumerate(group["params"]):
            who = repr(given[j]) if given else f"#{len(names)}"
            names.append(f"parameter {who} {tuple(p.shape)}")
            if not p.is_floating_point():
                raise TypeError(f"{owner} needs floating-point parameters; {names[-1]} is {p.dtype}")
            if first.setdefault(id(p), len(names) - 1) != len(names) - 1:
                raise ValueError(
                    f"{owner} got one parameter twice, as {names[first[id(p)]]} and as {names[-1]} "
                    f"(#{len(names) - 1}): it would be updated, sent and counted twice; list each once"
                )
    return names


def fp32_state(state: Any, p: torch.Tensor, name: str, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """state[p][name], made as zeros of ``like``'s shape (p's unless given: a DTensor's local
    shard) at first use; float32 and contiguous whatever the parameter (torch's
    load_state_dict casts state to the parameter dtype)."""
    st = state[p]
    buf = st.get(name)
    if buf is None:
        like = p if like is None else like
        buf = st[name] = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    elif buf.dtype != torch.float32 or not buf.is_contiguous():
        buf = st[name] = buf.to(torch.float32).contiguous()
    return buf


def unwrapped(optimizer: Any, kind: type | tuple[type, ...], needs: str) -> Any:
    """The ``kind`` optimizer inside a framework's wrapper (Accelerate's, Lightning's), or itself;
    else ValueError: "``needs``, got <type>"."""
    seen = optimizer
    for _ in range(4):
        if isinstance(seen, kind):
            return seen
        seen = getattr(seen, "optimizer", None) or getattr(seen, "_optimizer", None)
    raise ValueError(f"{needs}, got {type(optimizer).__name__}")
