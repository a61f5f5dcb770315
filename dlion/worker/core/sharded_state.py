"""An optimizer's state_dict over FSDP2's DTensor parameters, in the form
torch.distributed.checkpoint (DCP) keeps whole.

DCP's ``get_optimizer_state_dict`` keeps only ``state`` and ``param_groups``, and saves a plain
tensor once, as if every rank held the same. A dlion optimizer's per-rank state (each
replica's momentum) is therefore saved as a DTensor with a leading replica dimension
(``Sharding.to_saved``), and its step counters, the same on every rank, ride in every param
group under the optimizer's ``STATE_KEY``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dlion.worker.core.sharding import Sharding


def to_saved_form(
    sd: dict[str, Any], sharding: Sharding, params: Sequence[torch.Tensor], key: str, counters: dict[str, int]
) -> dict[str, Any]:
    """torch.optim's state_dict ``sd`` of these ``params``, in DCP's form (module doc)."""
    sd["state"] = {
        k: {n: sharding.to_saved(v, params[k]) if isinstance(v, torch.Tensor) else v for n, v in st.items()}
        for k, st in sd["state"].items()
    }
    sd["param_groups"] = [{**g, key: dict(counters)} for g in sd["param_groups"]]
    return sd


def from_saved_form(
    state_dict: dict[str, Any], sharding: Sharding, params: Sequence[torch.Tensor], key: str, owner: str
) -> dict[str, Any]:
    """Back to this rank's tensors, the counters under ``key`` at the top."""
    groups = [dict(g) for g in state_dict["param_groups"]]
    counters = [g.pop(key, None) for g in groups]
    ids = [k for g in groups for k in g["params"]]
    by_id = dict(zip(ids, params, strict=False))
    state = {
        k: {n: sharding.from_saved(v, by_id[k], owner) if k in by_id else v for n, v in st.items()}
        for k, st in state_dict["state"].items()
    }
    out = {**state_dict, "state": state, "param_groups": groups}
    if counters and counters[0]:  # a live group's key before any save is empty
        out[key] = counters[0]
    return out
