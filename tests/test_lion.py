"""The single-process reference and DistributedLion at world size 1."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import dlion
from dlion.compress.sign_ops import CpuSignOps, TorchSignOps


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3))


def _groups(model: torch.nn.Module) -> list[dict[str, object]]:
    first, second = model[0], model[2]  # type: ignore[index]
    return [
        {"params": list(first.parameters()), "lr": 3e-3, "weight_decay": 0.1},
        {"params": list(second.parameters()), "lr": 1e-3},
    ]


def _train(opt_factory, steps: int = 6, seed: int = 0) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    model = _model(seed)
    opt = opt_factory(_groups(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 13, generator=gen)

        def closure(x: torch.Tensor = x) -> torch.Tensor:
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            return loss

        opt.step(closure)
        sched.step()
    return [p.detach().clone() for p in model.parameters()]


def test_lion_matches_paper_formula_in_float64() -> None:
    p = torch.randn(50, dtype=torch.float64)
    g = torch.randn(50, dtype=torch.float64)
    m = torch.randn(50, dtype=torch.float64)
    lr, wd, b1, b2 = 0.01, 0.2, 0.9, 0.99
    param = torch.nn.Parameter(p.float().clone())
    opt = dlion.Lion([param], lr=lr, betas=(b1, b2), weight_decay=wd)
    opt.state[param]["exp_avg"] = m.float().clone()
    param.grad = g.float().clone()
    opt.step()
    c = b1 * m + (1 - b1) * g
    expect = p - lr * (torch.sign(c) + wd * p)
    torch.testing.assert_close(param.detach().double(), expect, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        opt.state[param]["exp_avg"].double(), b2 * m + (1 - b2) * g, atol=1e-6, rtol=1e-6
    )


def test_distributed_lion_world_size_one_equals_lion() -> None:
    a = _train(lambda g: dlion.Lion(g, betas=(0.9, 0.99)))
    b = _train(lambda g: dlion.DistributedLion(g))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_state_dict_round_trip_resumes_exactly() -> None:
    model = _model()
    opt = dlion.DistributedLion(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 13)).sum().backward()
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["dlion"]["steps_taken"] == 3
    model2 = _model(seed=5)
    model2.load_state_dict(saved_model)
    opt2 = dlion.DistributedLion(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved_opt)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(torch.full((2, 13), 0.5)).sum().backward()
        o.step()
    for x, y in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(x, y)
    assert opt2.steps_taken == 4


@pytest.mark.parametrize("vote", ["majority", "average"])
@pytest.mark.parametrize("tie", ["random", "zero"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_torch_ops_equal_numba_ops(vote: str, tie: str, n: int) -> None:
    """The torch-op kernels (the CUDA fallback) match the Numba kernels bit for bit."""
    rng = np.random.default_rng(n)
    size = 1000 + n
    grad = torch.from_numpy(rng.standard_normal(size).astype(np.float32))
    grad[::9] = 0
    outs = []
    for ops in (CpuSignOps(), TorchSignOps()):
        m = torch.zeros(size)
        bits = torch.zeros((size + 7) // 8, dtype=torch.uint8)
        ops.sign_step(grad, m, bits, 0.9, 0.99, 42)
        gathered = torch.from_numpy(rng.integers(0, 256, (n, bits.numel()), dtype=np.uint8))
        gathered[0] = bits
        planes, table = ops.combine(gathered.clone(), vote=vote, tie=tie, tie_key=99)
        p = torch.from_numpy(np.random.default_rng(0).standard_normal(size).astype(np.float32))
        ops.apply(p, planes, table, 1e-2, 0.5)
        q = torch.from_numpy(np.random.default_rng(1).standard_normal(size).astype(np.float32))
        ops.apply(q, planes, table, 1e-2, 0.5, cautious=True)
        outs.append((m, bits, planes, table, p, q))
        rng = np.random.default_rng(n)
        rng.standard_normal(size)
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_bfloat16_parameters_at_world_size_one() -> None:
    """bf16 gradients pass the non-finite check (NumPy cannot view bf16) and step like Lion."""
    a = torch.nn.Parameter(torch.linspace(-1, 1, 17, dtype=torch.bfloat16))
    b = torch.nn.Parameter(a.detach().clone())
    grad = torch.linspace(1, -1, 17, dtype=torch.bfloat16)
    for p, opt in ((a, dlion.DistributedLion([a], lr=0.01)), (b, dlion.Lion([b], lr=0.01))):
        p.grad = grad.clone()
        opt.step()
    assert torch.equal(a, b)
    a.grad = torch.full((17,), float("nan"), dtype=torch.bfloat16)
    with pytest.raises(dlion.NonFiniteGradientError):
        dlion.DistributedLion([a]).step()


def test_cautious_world_size_one_equals_cautious_lion() -> None:
    from dlion import DistributedLion, Lion

    rng = np.random.default_rng(5)
    init = rng.standard_normal(500).astype(np.float32)
    a = torch.nn.Parameter(torch.from_numpy(init.copy()))
    b = torch.nn.Parameter(torch.from_numpy(init.copy()))
    c = torch.nn.Parameter(torch.from_numpy(init.copy()))
    opts = [
        Lion([a], lr=0.01, weight_decay=0.5, cautious_wd=True),
        DistributedLion([b], lr=0.01, weight_decay=0.5, cautious_wd=True),
        Lion([c], lr=0.01, weight_decay=0.5),
    ]
    for _ in range(5):
        g = torch.from_numpy(rng.standard_normal(500).astype(np.float32))
        for p, opt in zip((a, b, c), opts, strict=True):
            p.grad = g.clone()
            opt.step()
    assert torch.equal(a, b) and not torch.equal(a, c)
