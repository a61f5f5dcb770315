"""The digits task (CNN on scikit-learn's digits) and the convergence benchmark's plan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.convergence import Plan, command
from dlion.train.config import TrainConfig
from dlion.train.digits import DigitsCNN, DigitsSampler, digits_eval_batches, load_digits
from dlion.train.tasks import build_task, evaluate

pytest.importorskip("sklearn", reason="the digits task needs scikit-learn: pip install -e '.[dev]'")


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    a, b = load_digits(), load_digits()
    assert torch.equal(a.val_y, b.val_y) and torch.equal(a.train_x, b.train_x)
    assert a.train_y.numel() + a.val_y.numel() == 1797 and a.train_x.shape[1:] == (1, 8, 8)
    assert float(a.train_x.min()) >= 0.0 and float(a.train_x.max()) <= 1.0
    counts = torch.bincount(a.val_y, minlength=10).float() / torch.bincount(
        torch.cat([a.train_y, a.val_y]), minlength=10
    )
    assert torch.allclose(counts, torch.full((10,), 0.2), atol=0.02)  # every class held out alike
    train_rows = {tuple(r.flatten().tolist()) for r in a.train_x}
    assert sum(tuple(r.flatten().tolist()) in train_rows for r in a.val_x) < 5  # a few duplicate images


def test_cnn_is_seeded_and_samplers_differ_by_rank() -> None:
    one, two, other = DigitsCNN(seed=3), DigitsCNN(seed=3), DigitsCNN(seed=4)
    for p, q, r in zip(one.parameters(), two.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q) and not torch.equal(p, r)
    data = load_digits()
    x0, _ = DigitsSampler(data, batch_size=8, seed=0, rank=0).next()
    x1, _ = DigitsSampler(data, batch_size=8, seed=0, rank=1).next()
    assert x0.shape == (8, 1, 8, 8) and not torch.equal(x0, x1)
    with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
        DigitsCNN(width=0)


def test_evaluate_scores_accuracy_over_every_validation_image() -> None:
    task = build_task(TrainConfig(task="digits"), rank=0, device=torch.device("cpu"))
    assert sum(y.numel() for _, y in task.val_batches) == load_digits().val_y.numel() == 359
    loss, acc = evaluate(task, torch.device("cpu"))
    assert acc is not None and 0.0 <= acc <= 1.0 and loss > 0
    # A model that always answers the label scores 1.
    batches = digits_eval_batches(load_digits(), batch_size=100)
    task.model.correct = lambda x, y: y.numel()
    task.val_batches = batches
    assert evaluate(task, torch.device("cpu"))[1] == 1.0
    with pytest.raises(ValueError, match="task must be one of bytes, digits; got 'mnist'"):
        TrainConfig(task="mnist")


def test_convergence_plan_validates_and_builds_commands(tmp_path: Path) -> None:
    grid = {"optimizers": ("dlion-mavo",), "workers": (4,), "seeds": (1,)}
    plan = Plan(tasks=("digits",), **grid, steps=5, rate="1gbit", out=tmp_path)
    cmd = command(plan, "digits", "dlion-mavo", 4, 1)
    assert cmd[2] == "launch.cluster" and cmd[cmd.index("--hosts") + 1] == "4"
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "runs" / "digits" / "dlion-mavo-w4-s1")
    assert cmd[cmd.index("--backend") + 1] == "sharded"  # the votes send their fewest bits
    assert "--backend" not in command(plan, "digits", "adamw-global", 4, 1)
    with pytest.raises(ValueError, match="optimizers must be a non-empty list"):
        Plan(
            tasks=("digits",), optimizers=("sgd",), workers=(2,), seeds=(0,), steps=1, rate=None, out=tmp_path
        )
    with pytest.raises(ValueError, match="workers must be a non-empty list of ints >= 1, got \\[0\\]"):
        Plan(
            tasks=("bytes",), optimizers=("lion",), workers=(0,), seeds=(0,), steps=1, rate=None, out=tmp_path
        )


@pytest.mark.slow  # CI: the plan's test above; the local-steps study's short run runs the same jobs
def test_convergence_bench_runs_and_resumes(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.convergence", "--tasks", "digits", "--workers", "2"]
    cmd += ["--optimizers", "dlion-mavo,adamw-global", "--seeds", "0", "--steps", "3", "--out", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    points = json.loads((tmp_path / "points.json").read_text())
    assert [(p["task"], p["optimizer"], p["workers"]) for p in points] == [
        ("digits", "adamw-global", 2),
        ("digits", "dlion-mavo", 2),
    ]
    adamw, dlion = points
    assert all(0.0 <= p["final_val_accuracy_mean"] <= 1.0 for p in points)
    assert dlion["bits_per_param_up"] == pytest.approx(1.0, abs=0.05)
    assert adamw["bits_per_param_up"] == pytest.approx(32.0, abs=0.05)  # ring all-reduce at N = 2
    for name in ("loss_vs_bits.png", "digits/report.md", "digits/val_loss_vs_bytes.png"):
        assert (tmp_path / name).read_bytes()[:4] in (b"\x89PNG", b"# Tr"), name
    # A narrower plan into the same folder runs nothing again and still sums up every run.
    narrower = [*cmd[: cmd.index("--optimizers") + 1], "dlion-mavo", *cmd[cmd.index("--optimizers") + 2 :]]
    again = subprocess.run(narrower, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "[1/1]" not in again.stdout, again.stderr[-3000:]
    assert json.loads((tmp_path / "points.json").read_text()) == points


def test_convergence_plan_runs_many_workers_as_virtual_workers(tmp_path: Path) -> None:
    grid = {"optimizers": ("dlion-mavo", "powersgd"), "workers": (4, 16), "seeds": (0,)}
    plan = Plan(tasks=("bytes",), **grid, steps=5, rate=None, out=tmp_path)
    assert command(plan, "bytes", "dlion-mavo", 16, 0)[3:5] == ["train", "--virtual-workers"]
    assert "--virtual-workers" not in command(plan, "bytes", "dlion-mavo", 4, 0)
    assert "--virtual-workers" not in command(plan, "bytes", "powersgd", 16, 0)  # DDP needs processes
    shaped = Plan(tasks=("bytes",), **grid, steps=5, rate="1gbit", out=tmp_path)
    assert not shaped.virtual("dlion-mavo", 16)  # emulated hosts are there for their network


def test_sweep_cells_name_their_hyperparameters(tmp_path: Path) -> None:
    from bench.sweep import jobs

    made = jobs("bytes", ["lion", "adamw"], workers=4, steps=400, seed=0, out=tmp_path, virtual=True)
    labels = [j.out.name for j in made]
    assert labels[0] == "dlion-mavo-lr0.0005-b0.8_0.9-w4-s0"
    assert "adamw-global-lr0.004-b0.9_0.999-w4-s0" in labels
    first = made[0].argv
    assert first[first.index("--beta2") + 1] == "0.9" and "--virtual-workers" in first
    with pytest.raises(ValueError, match="no sweep for families \\['sgd'\\]"):
        jobs("bytes", ["sgd"], workers=4, steps=1, seed=0, out=tmp_path, virtual=False)
