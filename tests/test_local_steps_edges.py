"""LocalSteps at its edges: a sync right after a load, bf16 momentum through a load, error
feedback under an all-reduce outer step, and what it refuses."""

from __future__ import annotations

import pytest
import torch

from multiproc import run_ok


def _sync_after_load(rank: int, world: int) -> list[torch.Tensor]:
    """H = 4: two steps, the state saved, a fresh optimizer loads it and syncs at once (a
    framework resuming at its last step), with no ledger step on record to add the vote to."""
    import dlion

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = dlion.build_optimizer("dlion-local", model.parameters(), lr=0.01, weight_decay=0.1, local_steps=4)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        model(torch.randn(5, 4, generator=g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    saved = opt.state_dict()
    again = dlion.build_optimizer("dlion-local", model.parameters(), lr=0.01, weight_decay=0.1, local_steps=4)
    again.load_state_dict(saved)
    again.sync()  # type: ignore[attr-defined]
    assert again.rounds == 1 and again.ledger.n_steps == 1  # type: ignore[attr-defined]
    return [p.detach().clone() for p in model.parameters()]


def test_sync_right_after_a_load_ends_the_round_on_every_rank() -> None:
    a, b = run_ok(_sync_after_load, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_bf16_parameters_keep_fp32_inner_momentum_through_a_load() -> None:
    import dlion

    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = dlion.build_optimizer("dlion-local", model.parameters(), lr=0.01, weight_decay=0.0, local_steps=4)
    model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    again = dlion.build_optimizer("dlion-local", model.parameters(), lr=0.01, weight_decay=0.0, local_steps=4)
    again.load_state_dict(opt.state_dict())
    moms = [s["exp_avg"] for s in again.inner.state.values()]  # type: ignore[attr-defined]
    assert moms and all(m.dtype == torch.float32 for m in moms)


def _ef_under_all_reduce(rank: int, world: int) -> list[torch.Tensor]:
    """SGD inner (lr 1), the fp32 all-reduce baseline outer, H = 1, error feedback: each rank's
    residual is its own pseudo-gradient's, not the mean the outer step wrote."""
    from dlion.worker.baselines.global_opt import GlobalOptimizer
    from dlion.worker.local.config import LocalStepsConfig
    from dlion.worker.local.optimizer import LocalSteps

    p = torch.nn.Parameter(torch.zeros(4))
    outer = GlobalOptimizer(torch.optim.SGD([p], lr=1.0))
    opt = LocalSteps(
        torch.optim.SGD([p], lr=1.0), outer, LocalStepsConfig(local_steps=1, error_feedback=True)
    )
    p.grad = torch.tensor([1.0, 2.0, 3.0, 4.0]) * (1 if rank == 0 else -1)
    opt.step()
    assert opt._residual is not None
    return list(opt._residual)


def test_error_feedback_keeps_each_ranks_own_residual_under_an_all_reduce() -> None:
    for rank, (residual,) in enumerate(run_ok(_ef_under_all_reduce, 2)):
        sign = 1 if rank == 0 else -1
        assert torch.equal(residual, sign * torch.tensor([-1.5, -0.5, 0.5, 1.5]))


def test_what_local_steps_refuse() -> None:
    import dlion
    from dlion.server import ServerLink

    model = torch.nn.Linear(4, 3)
    opt = dlion.build_optimizer("dlion-local", model.parameters(), lr=0.01, weight_decay=0.0)
    with pytest.raises(ValueError, match="new param groups"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
    inner, outer = dlion.Lion(model.parameters()), dlion.DistributedLion(model.parameters(), overlap=True)
    with pytest.raises(ValueError, match="must not overlap"):
        dlion.LocalSteps(inner, outer, dlion.LocalStepsConfig())
    link = object.__new__(ServerLink)
    with pytest.raises(ValueError, match="dedicated parameter server"):
        dlion.build_optimizer(
            "dlion-local", model.parameters(), lr=0.01, weight_decay=0.0, backend="server", server=link
        )
