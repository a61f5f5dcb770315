"""Byzantine workers: the corruptions themselves, and DistributedLion and the all-reduce
baselines with attackers on 3-4 Gloo ranks against single-process references, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed_lion import BUCKET_NUMEL, GROUPS, _train, assert_bits_equal, init_params, make_grads

from dlion.kernels import pack_signs_ref
from dlion.train.config import TrainConfig
from dlion.worker.catalogue import build_optimizer
from dlion.worker.core.byzantine import Byzantine, attack_key, corrupt_grad, corrupt_signs

from multiproc import run_ok
from sim import simulate


def _packed(numel: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    signs = np.random.default_rng(seed).standard_normal(numel).astype(np.float32)
    packed = pack_signs_ref(signs)
    return packed, torch.from_numpy(packed.copy())


@pytest.mark.parametrize("numel", [1, 13, 64, 1001])
def test_corrupt_signs_touches_only_the_payload(numel: int) -> None:
    honest, bits = _packed(numel)
    corrupt_signs(bits, numel, "flip", key=5)
    flipped = np.unpackbits(bits.numpy(), count=numel)
    assert (flipped == 1 - np.unpackbits(honest, count=numel)).all()
    assert not np.unpackbits(bits.numpy())[numel:].any()  # padding stays 0, as honest ranks send it
    corrupt_signs(bits, numel, "zero", key=5)
    assert not bits.any()


def test_random_signs_are_fair_coins_keyed_by_rank_and_step() -> None:
    numel = 20_000
    draws = []
    for key in (attack_key(0, 3, 1, 2), attack_key(0, 3, 1, 2), attack_key(0, 4, 1, 2)):
        _, bits = _packed(numel)
        corrupt_signs(bits, numel, "random", key)
        draws.append(np.unpackbits(bits.numpy(), count=numel))
    assert (draws[0] == draws[1]).all() and (draws[0] != draws[2]).any()
    assert 0.48 < draws[0].mean() < 0.52


def test_corrupt_grad() -> None:
    g = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    flipped = g.clone()
    corrupt_grad(flipped, "flip", key=1)
    assert torch.equal(flipped, -g)
    noise, again = g.clone(), g.clone()
    corrupt_grad(noise, "random", key=1)
    corrupt_grad(again, "random", key=1)
    assert torch.equal(noise, again) and not torch.equal(noise, g)
    rms = float(g.pow(2).mean().sqrt())
    assert abs(float(noise.pow(2).mean().sqrt()) - rms) < 0.1 * rms  # same scale as the gradient
    corrupt_grad(noise, "zero", key=1)
    assert not noise.any()


def test_bad_settings_are_refused_with_the_value() -> None:
    with pytest.raises(ValueError, match="attack must be one of flip, random, zero; got 'invert'"):
        Byzantine(workers=1, attack="invert")
    with pytest.raises(ValueError, match="byzantine workers must be an int >= 0, got -1"):
        Byzantine(workers=-1)
    with pytest.raises(ValueError, match="3 byzantine workers out of 3 leaves no honest rank"):
        Byzantine(workers=3).attacks(0, 3)
    with pytest.raises(ValueError, match=r"byzantine workers are an option of .*; got optimizer 'terngrad'"):
        TrainConfig(optimizer="terngrad", byzantine=1)
    with pytest.raises(ValueError, match="attack must be one of flip, random, zero; got 'nan'"):
        TrainConfig(attack="nan")
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match=r"option of .*; got optimizer 'dgc'"):
        build_optimizer("dgc", params, lr=0.1, weight_decay=0.0, byzantine=Byzantine(workers=1))
    with pytest.raises(ValueError, match="1 byzantine workers out of 1 leaves no honest rank"):
        build_optimizer("dlion-mavo", params, lr=0.1, weight_decay=0.0, byzantine=Byzantine(workers=1))


# (world, attackers, attack, vote, backend): every attack, both votes, every backend.
CASES = [
    (3, 1, "flip", "majority", "allgather"),
    (3, 1, "random", "majority", "sharded"),
    (3, 2, "zero", "majority", "server"),
    (4, 1, "flip", "average", "sharded"),
    (4, 1, "random", "majority", "allgather"),
    (4, 2, "zero", "average", "server"),
]


def _vote_runs(rank: int, world: int) -> list[dict[str, object]]:
    return [
        _train(rank, world, vote, "random", seed=7, backend=backend, byzantine=Byzantine(workers=k, attack=a))
        for w, k, a, vote, backend in CASES
        if w == world
    ]


@pytest.mark.parametrize("world", [3, 4])
def test_attacked_vote_matches_simulation(world: int) -> None:
    """The attackers' bits reach the vote as the simulation corrupts them; their momenta stay
    honest, and they send exactly the bytes an honest rank sends."""
    results = run_ok(_vote_runs, world)
    cases = [c for c in CASES if c[0] == world]
    honest = simulate(init_params(), GROUPS, make_grads(world), vote="majority", tie="random", seed=7,
                      bucket_numel=BUCKET_NUMEL)[0]  # fmt: skip
    for c, (_, k, attack, vote, backend) in enumerate(cases):
        expect, moms = simulate(
            init_params(), GROUPS, make_grads(world), vote=vote, tie="random", seed=7,
            bucket_numel=BUCKET_NUMEL, attack=attack, attackers=k,
        )  # fmt: skip
        where = (attack, vote, backend)
        for rank in range(world):
            assert_bits_equal(results[rank][c], expect, moms[rank], (*where, rank))
        if backend != "server":  # the server receives more than it sends; the others are symmetric
            assert results[world - 1][c]["step_bytes"] == results[0][c]["step_bytes"], where
        if vote == "majority":
            assert any((a != b).any() for a, b in zip(expect, honest, strict=True)), where


def _global_runs(rank: int, world: int, negate_last: bool, byzantine: Byzantine | None) -> list[torch.Tensor]:
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    opt = build_optimizer("adamw-global", params, lr=1e-2, weight_decay=0.1, seed=3, byzantine=byzantine)
    for step, per_rank in enumerate(make_grads(world)):
        for p, g in zip(params, per_rank[rank], strict=True):
            g = np.zeros(p.shape, np.float32) if g is None else g
            p.grad = torch.from_numpy(-g if negate_last and rank == world - 1 else g.copy())
        opt.step()
        assert opt.state_dict()["global"]["steps_taken"] == step + 1
    return [p.detach().clone() for p in params]


def test_flipped_gradients_equal_negated_ones_on_the_all_reduce() -> None:
    """adamw-global with the last rank flipping equals honest ranks where that rank's
    gradients are negated: the corruption is exactly a negation, before the all-reduce."""
    attacked = run_ok(_global_runs, 3, negate_last=False, byzantine=Byzantine(workers=1, attack="flip"))
    negated = run_ok(_global_runs, 3, negate_last=True, byzantine=None)
    honest = run_ok(_global_runs, 3, negate_last=False, byzantine=None)
    for a, b, h in zip(attacked[0], negated[0], honest[0], strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, h)
    for rank in (1, 2):
        assert all(torch.equal(a, b) for a, b in zip(attacked[rank], attacked[0], strict=True))


# CI runs the bench on dlion-mavo alone; -m slow on the default pair.
@pytest.mark.parametrize(
    "optimizers",
    [pytest.param(o, marks=pytest.mark.slow) for o in (("dlion-mavo",), ("dlion-mavo", "adamw-global"))],
)
def test_byzantine_bench_runs_attacked_jobs(tmp_path: Path, optimizers: tuple[str, ...]) -> None:
    cmd = [sys.executable, "-m", "bench.byzantine", "--small", "--task", "digits", "--steps", "3"]
    if len(optimizers) == 1:
        cmd += ["--optimizers", *optimizers]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "byzantine.json").read_text())
    got = {(r["optimizer"], r["attack"], r["byzantine"]): r["final_val_loss_mean"] for r in rows}
    runs = (("none", 0), ("flip", 1))
    assert set(got) == {(o, a, k) for o in optimizers for a, k in runs}
    for optimizer in optimizers:
        assert got[(optimizer, "flip", 1)] != got[(optimizer, "none", 0)]  # the attacker changed training
        report = json.loads((tmp_path / "runs" / f"{optimizer}-flip-k1-s0" / "report.json").read_text())
        assert (report["config"]["byzantine"], report["config"]["attack"]) == (1, "flip")
    assert "| dlion-mavo | flip |" in (tmp_path / "byzantine.md").read_text()
    assert (tmp_path / "byzantine.png").read_bytes()[:4] == b"\x89PNG"
