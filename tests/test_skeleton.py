"""Every optimizer of the catalogue is a torch.optim.Optimizer: an LR scheduler drives it as it
is, and a state_dict round trip keeps what the optimizer and its inner one share."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from dlion.worker.catalogue import build_optimizer, entry, names
from dlion.worker.core.base import CommOptimizer
from dlion.worker.local.optimizer import LocalSteps

from multiproc import run_ok


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.ones(2, 4)).pow(2).sum().backward()
    opt.step()


# powersgd communicates inside DDP's backward, not in step(): tests/test_powersgd.py.
@pytest.mark.parametrize("name", names(ddp=False))
def test_a_scheduler_drives_every_optimizer_itself(name: str) -> None:
    model = _model()
    opt = build_optimizer(name, model.parameters(), lr=0.1, weight_decay=0.0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert isinstance(opt, (CommOptimizer, LocalSteps)) or entry(name).single_process
    sched = LambdaLR(opt, lambda s: 0.0 if s == 0 else 1.0)  # lr 0 for the first step only
    before = [p.detach().clone() for p in model.parameters()]
    _step(model, opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)), name
    sched.step()
    inner = getattr(opt, "inner", opt)
    assert [g["lr"] for g in inner.param_groups] == [0.1]  # what the update rule reads
    _step(model, opt)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)), name


def test_a_scheduler_drives_the_ddp_baseline_itself() -> None:
    opt = build_optimizer("powersgd", _model().parameters(), lr=0.1, weight_decay=0.0)
    assert isinstance(opt, torch.optim.Optimizer)
    LambdaLR(opt, lambda s: 0.5)
    assert opt.inner.param_groups is opt.param_groups and opt.inner.param_groups[0]["lr"] == 0.05  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["terngrad", "adamw-global", "lion-global"])
def test_an_inner_optimizer_shares_groups_and_state_after_a_load(name: str) -> None:
    model = _model()
    opt = build_optimizer(name, model.parameters(), lr=0.1, weight_decay=0.0)
    _step(model, opt)
    saved = opt.state_dict()
    again = build_optimizer(name, _model().parameters(), lr=0.5, weight_decay=0.0)
    again.load_state_dict(saved)
    inner = again.inner  # type: ignore[attr-defined]
    assert inner.param_groups is again.param_groups and inner.state is again.state
    assert again.param_groups[0]["lr"] == 0.1 and len(again.state) == len(opt.state) > 0
    assert again.steps_taken == 1  # type: ignore[attr-defined]
    LambdaLR(again, lambda s: 0.25)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)


def _handed_in(rank: int, world: int) -> dict[str, object]:
    from datetime import timedelta

    from dlion import DistributedLion
    from dlion.transport import TorchComm

    comm = TorchComm(None, timedelta(seconds=30))
    p = torch.nn.Parameter(torch.zeros(10))
    opt = DistributedLion([p], lr=0.1, process_group=comm)
    p.grad = torch.full((10,), 1.0 if rank == 0 else -1.0)
    opt.step()
    return {"same": opt._comm is comm, "bytes": opt.ledger.summary()["bytes_sent"], "p": p.detach().clone()}


def test_a_transport_handed_in_is_used_as_it_is() -> None:
    out = run_ok(_handed_in, 2)
    assert all(r["same"] and r["bytes"] > 0 for r in out)
    assert torch.equal(out[0]["p"], out[1]["p"])  # type: ignore[arg-type]
