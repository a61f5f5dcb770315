"""Ranks start equal, whatever they were built from; the optimizer may come before the
process group; groups added mid-run train on every rank alike."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_bad_input import start_error

from multiproc import run_ok

# Every communicating row of the catalogue, on its default backend.
COMMUNICATING = ("dlion-mavo", "dlion-avg", "signum-mavo", "terngrad", "dgc", "adamw-global", "lion-global")
SHAPES = [(5, 3), (7,), (2, 2, 2)]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))


def _grads(model: torch.nn.Module, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _build(name: str, params: object, **kwargs: object) -> torch.optim.Optimizer:
    from dlion.worker.catalogue import build_optimizer, entry

    e = entry(name)
    return build_optimizer(name, params, lr=e.lr, weight_decay=e.weight_decay, seed=3, **kwargs)  # type: ignore[arg-type]


def _differently_seeded(rank: int, world: int, names: tuple[str, ...], same: bool) -> dict[str, object]:
    """Each rank builds its own model (``same``: rank 0's), buffers differing too."""
    out: dict[str, object] = {}
    for name in names:
        model = _model(seed=0 if same else rank)
        with torch.no_grad():
            model[1].running_mean.fill_(0.0 if same else float(rank))
        opt = _build(name, model.parameters())
        opt.sync_buffers(model)  # type: ignore[attr-defined]
        # The process group exists: the ranks hold rank 0's model before the first forward.
        start = [t.detach().numpy().copy() for t in model.state_dict().values()]
        for step in range(2):
            _grads(model, rank, step)
            opt.step()
        extra = opt.ledger.extra  # type: ignore[attr-defined]
        out[name] = {
            "start": start,
            "state": [t.detach().numpy().copy() for t in model.state_dict().values()],
            "start_records": [
                (r.name, r.sent.bits, r.received.bits) for r in extra if r.name.startswith("start")
            ],
            "total_sent": opt.ledger.summary()["bytes_sent"],  # type: ignore[attr-defined]
            "bits_up": opt.ledger.summary()["bits_per_param_up"],  # type: ignore[attr-defined]
        }
    return out


def test_broadcast_start_makes_differently_seeded_ranks_equal_and_is_counted() -> None:
    world = 3
    results = run_ok(_differently_seeded, world, names=COMMUNICATING, same=False)
    reference = run_ok(_differently_seeded, world, names=COMMUNICATING, same=True)
    for name in COMMUNICATING:
        for key in ("start", "state"):
            states = [r[name][key] for r in results]
            for rank in range(1, world):
                for a, b in zip(states[0], states[rank], strict=True):
                    assert a.tobytes() == b.tobytes(), (name, key, rank)
        # Only the tensors that differ travel: the Linear layers' (12 + 4 + 8 + 2 = 26 numbers)
        # and BatchNorm's running mean (4); its weight, bias, running var and counter are the
        # same on every rank (ones, zeros, ones, 0) and only their checksums are sent.
        sends = [[rec for rec in r[name]["start_records"] if rec[0] != "start check"] for r in results]
        payload_bits = 32 * (26 + 4)
        sent_by_rank0 = sum(bits for _, bits, _ in sends[0])
        assert sent_by_rank0 >= payload_bits * (world - 1), name
        for rank in range(1, world):
            assert sum(bits for _, _, bits in sends[rank]) >= payload_bits, (name, rank)
            assert sum(bits for _, bits, _ in sends[rank]) == 0, (name, rank)
        # Ranks built alike send their checksums only.
        for r in reference:
            assert {rec[0] for rec in r[name]["start_records"]} == {"start check"}, name
        # The broadcast is in the byte totals, not in the per-step bits (alike on every rank
        # on these default backends).
        assert results[0][name]["total_sent"] > results[1][name]["total_sent"], name
        assert results[0][name]["bits_up"] == results[1][name]["bits_up"], name
        # Rank 0's start: the same run as ranks all built from rank 0's seed.
        for a, b in zip(states[0], reference[0][name]["state"], strict=True):
            assert a.tobytes() == b.tobytes(), name


def _verify(rank: int, world: int, name: str) -> str:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    if rank == world - 1:
        with torch.no_grad():
            params[1][3] += 1.0  # the last rank's second tensor differs
    return start_error(lambda: _build(name, params, start="verify"), params)


@pytest.mark.parametrize("name", ["dlion-mavo", "adamw-global"])
def test_verify_start_raises_on_every_rank_naming_the_tensor_and_rank(name: str) -> None:
    world = 3
    for message in run_ok(_verify, world, name=name):
        assert "parameter #1 (7,)" in message and f"rank(s) {world - 1}" in message, message
        assert "start='broadcast'" in message


def _late_group(rank: int, world: int, store: str, name: str) -> list[np.ndarray]:
    import torch.distributed as dist

    dist.destroy_process_group()  # the optimizer is built before any group, as HF's Trainer can
    torch.manual_seed(rank)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = _build(name, params)
    assert not opt.communicates  # type: ignore[attr-defined]
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    assert opt.communicates and opt.ledger.n_steps == 3  # type: ignore[attr-defined]
    return [p.detach().numpy().copy() for p in params]


@pytest.mark.parametrize("name", ["dlion-mavo", "terngrad", "adamw-global"])
def test_optimizer_built_before_the_process_group_communicates(name: str, tmp_path: object) -> None:
    store = os.path.join(str(tmp_path), "late-store")
    results = run_ok(_late_group, 2, store=store, name=name)
    for a, b in zip(results[0], results[1], strict=True):
        assert a.tobytes() == b.tobytes()


def test_world_size_without_a_process_group_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = _build("dlion-mavo", params)
    for p in params:
        p.grad = torch.ones_like(p)
    monkeypatch.setenv("WORLD_SIZE", "4")
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=4 but no torch\.distributed process group"):
        opt.step()
    for a, b in zip(params, before, strict=True):
        assert torch.equal(a, b)  # nothing moved


def _added_group(rank: int, world: int, name: str, late: bool) -> list[np.ndarray]:
    """Group B joins at step 2 (``late``), or is there from the start without gradients until
    then: the two must give the same parameters, bit for bit."""
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    b = [torch.nn.Parameter(torch.randn(s)) for s in reversed(SHAPES)]
    opt = _build(name, [{"params": a}] if late else [{"params": a}, {"params": b, "lr": 0.01}])
    for step in range(5):
        if late and step == 2:
            opt.add_param_group({"params": b, "lr": 0.01})
        g = torch.Generator().manual_seed(100 * step + rank)
        for p in a:
            p.grad = torch.randn(p.shape, generator=g)
        for p in b:
            p.grad = torch.randn(p.shape, generator=g) if step >= 2 else None
        opt.step()
    return [p.detach().numpy().copy() for p in [*a, *b]]


@pytest.mark.parametrize("name", COMMUNICATING)
def test_added_param_group_trains_as_if_it_had_been_there(name: str) -> None:
    world = 2
    late = run_ok(_added_group, world, name=name, late=True)
    early = run_ok(_added_group, world, name=name, late=False)
    for rank in range(world):
        for i, (x, y) in enumerate(zip(late[rank], early[rank], strict=True)):
            assert x.tobytes() == y.tobytes(), (name, rank, i)
    assert any(x.tobytes() != y.tobytes() for x, y in zip(late[0][3:], _initial_b(), strict=True))


def _initial_b() -> list[np.ndarray]:
    torch.manual_seed(0)
    [torch.randn(s) for s in SHAPES]
    return [torch.randn(s).numpy() for s in reversed(SHAPES)]


def _rank0_loads_after_build(rank: int, world: int) -> list[np.ndarray]:
    """Built from one seed (equal at construction), then rank 0 alone loads other weights, as a
    script that restores a checkpoint on rank 0 only: the first step starts them equal again."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = _build("dlion-mavo", params)
    if rank == 0:
        with torch.no_grad():
            params[2].add_(1.0)
    _grads(torch.nn.ParameterList(params), rank, 0)
    opt.step()
    sent = {r.name for r in opt.ledger.extra if r.name.startswith("start[")}  # type: ignore[attr-defined]
    assert sent == {"start[torch.float32]"}, sent
    return [p.detach().numpy().copy() for p in params]


def test_parameters_changed_after_construction_start_equal_at_the_first_step() -> None:
    results = run_ok(_rank0_loads_after_build, 3)
    for rank in range(1, 3):
        for a, b in zip(results[0], results[rank], strict=True):
            assert a.tobytes() == b.tobytes(), rank
