"""dlion.attach: DDP with the dlion communication hook equals plain DistributedLion (no DDP), bit
for bit, on 2 and 3 Gloo ranks; DDP sends nothing; detach restores its all-reduce; the guard
warns when DDP averages the gradients before the vote."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import pytest
import torch

from multiproc import run_ok

STEPS = 5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(9, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 3),
    )


def _train(
    rank: int,
    world: int,
    ddp: bool,
    vote: str = "majority",
    backend: str = "allgather",
    micro: int = 1,
    nan_step: int = -1,
    flat: bool = False,
) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dlion

    if flat:  # flat buckets in Numba's CUDA simulator: the ranks agree on the device
        from test_flat_runner import _flat_everywhere

        _flat_everywhere()

    model = _model()
    opt = dlion.DistributedLion(
        model.parameters(), lr=0.01, weight_decay=0.1, vote=vote, backend=backend,  # type: ignore[arg-type]
        bucket_numel=128, nonfinite="skip",
    )  # fmt: skip
    net: torch.nn.Module = model
    if ddp:
        net = DDP(model, bucket_cap_mb=0.0006)  # ~150 fp32 per DDP bucket: buckets unlike dlion's
        dlion.attach(net, opt)
    gen = torch.Generator().manual_seed(100 + rank)
    grads_local, launched = [], []
    for step in range(STEPS):
        opt.zero_grad()
        for m in range(micro):
            x, y = torch.randn(8, 9, generator=gen), torch.randn(8, 3, generator=gen)
            last = m == micro - 1
            with net.no_sync() if ddp and not last else contextlib.nullcontext():  # type: ignore[operator]
                loss = torch.nn.functional.mse_loss(net(x), y)
                if step == nan_step and rank == world - 1 and last:
                    loss = loss * float("nan")
                loss.backward()
        grads_local.append(model[0].weight.grad.clone())  # type: ignore[union-attr]
        launcher = opt.launching.launcher
        launched.append(launcher._next if launcher is not None else -1)  # buckets voted in backward
        opt.step()
    opt.close()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "momenta": [opt.state[p]["exp_avg"].clone() for p in model.parameters()],
        "skipped": opt.skipped_steps,
        "step_bytes": opt.ledger.step_bytes(),
        "grad": grads_local[-1],
        "launched": launched,
        "buckets": len(opt.plan.buckets),
        "on_device": opt.plan.on_device,
    }


def _bits_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b, strict=True))


CASES = [
    (2, {"vote": "majority", "backend": "allgather"}),  # even N: tie coins
    (2, {"vote": "average", "backend": "sharded"}),
    (2, {"vote": "majority", "backend": "sharded", "micro": 3}),  # accumulation under no_sync
    (2, {"vote": "majority", "backend": "server"}),  # the hook only silences DDP
    (3, {"vote": "majority", "backend": "sharded", "nan_step": 2}),  # a NaN step, skipped
    (3, {"vote": "average", "backend": "allgather"}),
]


@pytest.mark.parametrize(("world", "kw"), CASES)
def test_ddp_with_the_hook_equals_plain_distributed_lion(world: int, kw: dict[str, Any]) -> None:
    hooked = run_ok(_train, world, ddp=True, **kw)
    plain = run_ok(_train, world, ddp=False, **kw)
    for a, b in zip(hooked, plain, strict=True):
        assert _bits_equal(a["params"], b["params"]) and _bits_equal(a["momenta"], b["momenta"]), kw
        assert a["skipped"] == b["skipped"] == (1 if "nan_step" in kw else 0)
        # The same collectives, so the same bytes (a NaN step sent its bits before it was skipped).
        same = [s for s in range(STEPS) if s != kw.get("nan_step")]
        assert [a["step_bytes"][s] for s in same] == [b["step_bytes"][s] for s in same]
    assert _bits_equal(hooked[0]["params"], hooked[1]["params"])
    # From the second step on, every bucket's vote ran inside backward, from DDP's hook.
    n = hooked[0]["buckets"]
    expect = [-1] * STEPS if kw["backend"] == "server" else [0] + [n] * (STEPS - 1)
    assert all(h["launched"] == expect for h in hooked), (hooked[0]["launched"], expect)
    # DDP did not average: each rank kept its own gradient.
    assert not torch.equal(hooked[0]["grad"], hooked[1]["grad"])


def _detach_and_guard(rank: int, world: int) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dlion
    from dlion.worker.core.guard import AveragedGradientsWarning

    out: dict[str, Any] = {}
    for hooked in (True, False):
        model = _model()
        net = DDP(model)
        opt = dlion.DistributedLion(model.parameters(), lr=0.01)
        handle = dlion.attach(net, opt) if hooked else None
        x = torch.randn(4, 9, generator=torch.Generator().manual_seed(rank))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                opt.zero_grad()
                net(x).sum().backward()
                opt.step()
        out[f"warned_{hooked}"] = [str(w.message) for w in caught if w.category is AveragedGradientsWarning]
        if handle is not None:
            out["own_grad"] = model[0].weight.grad.clone()  # type: ignore[union-attr]
            handle.detach()  # DDP all-reduces again
            opt.zero_grad()
            net(x).sum().backward()
            out["averaged_grad"] = model[0].weight.grad.clone()  # type: ignore[union-attr]
    return out


def test_detach_restores_the_all_reduce_and_the_guard_warns_without_the_hook() -> None:
    a, b = run_ok(_detach_and_guard, 2)
    assert not torch.equal(a["own_grad"], b["own_grad"])
    assert torch.equal(a["averaged_grad"], b["averaged_grad"])
    for r in (a, b):
        assert r["warned_True"] == []
        (message,) = r["warned_False"]  # once, on every rank
        assert "dlion.attach(ddp_model, optimizer)" in message and "bytes per parameter" in message


def _attach_plain_model(rank: int, world: int) -> str:
    import dlion

    model = _model()
    with pytest.raises(ValueError, match="needs a DistributedDataParallel or FSDP2") as err:
        dlion.attach(model, dlion.DistributedLion(model.parameters()))
    return str(err.value)


def test_attach_refuses_what_it_cannot_serve() -> None:
    for message in run_ok(_attach_plain_model, 2):
        assert "without DDP or FSDP, DistributedLion needs no hook" in message


def test_attach_at_world_size_one_does_nothing_and_training_goes_on() -> None:
    """One process (Accelerate with one process): no all-reduce to replace, as the callbacks."""
    import dlion

    model = _model()
    opt = dlion.DistributedLion(model.parameters(), lr=0.01)
    handle = dlion.attach(model, opt)
    assert not handle.attached and handle.ddp is None
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 9)).sum().backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    handle.detach()  # harmless
    with pytest.raises(ValueError, match="vote_in_step must be None, True or False"):
        dlion.attach(model, opt, vote_in_step="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"needs a dlion\.DistributedLion"):
        dlion.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_the_hook_on_flat_buckets_agrees_on_the_device_like_the_host() -> None:
    """The DDP hook path with flat buckets (votes in backward, agreement and the NaN skip on
    the device) equals plain per-tensor DistributedLion bit for bit."""
    kw = {"vote": "majority", "backend": "sharded", "nan_step": 2}
    hooked = run_ok(_train, 3, ddp=True, flat=True, **kw)
    plain = run_ok(_train, 3, ddp=False, **kw)
    for a, b in zip(hooked, plain, strict=True):
        assert a["on_device"] and not b["on_device"]
        assert _bits_equal(a["params"], b["params"]) and _bits_equal(a["momenta"], b["momenta"])
        assert a["skipped"] == b["skipped"] == 1
