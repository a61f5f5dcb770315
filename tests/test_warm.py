"""The kernels are compiled before the first step: after warm_up(), a step of every CPU path
(both votes at even and odd N on every backend, TernGrad, DGC, the fp32 baseline) compiles
nothing more, so no step waits for Numba and no step time counts a compile."""

from __future__ import annotations

from typing import Any

import pytest

from multiproc import run_ok


def _signatures() -> dict[str, int]:
    from dlion.kernels import common, cpu, cpu_vote, ternary

    return {
        f"{mod.__name__}.{name}": len(obj.signatures)
        for mod in (common, cpu, cpu_vote, ternary)
        for name, obj in vars(mod).items()
        if hasattr(obj, "signatures") and hasattr(obj, "py_func")
    }


def _after_warm_up(rank: int, world: int) -> dict[str, Any]:
    import torch

    import dlion
    from dlion.compress.warm import warm_up

    warm_up()
    before = _signatures()
    for vote in ("majority", "average"):
        for backend in ("allgather", "sharded", "server"):
            for tie in ("random", "zero"):
                p = torch.nn.Parameter(torch.zeros(37))
                opt = dlion.DistributedLion([p], vote=vote, tie=tie, backend=backend, force_comm=True)
                for _ in range(2):
                    p.grad = torch.randn(37)
                    opt.step()
    for name in ("terngrad", "dgc", "adamw-global"):
        q = torch.nn.Parameter(torch.zeros(6, 5))
        other = dlion.build_optimizer(name, [q], lr=0.1, weight_decay=0.0)
        q.grad = torch.randn(6, 5)
        other.step()
    return {"before": before, "after": _signatures()}


@pytest.mark.parametrize("world", [1, 2])
def test_warm_up_leaves_nothing_to_compile(world: int) -> None:
    for out in run_ok(_after_warm_up, world):
        grew = {k: (out["before"][k], v) for k, v in out["after"].items() if v != out["before"].get(k)}
        assert grew == {}
