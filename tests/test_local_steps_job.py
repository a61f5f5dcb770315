"""dlion-local and DiLoCo in the training job: virtual workers equal processes, a run killed in
the middle of a round resumes to the unbroken run's bits, the report counts rounds and bits."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from test_virtual import _assert_same_run

from dlion.train.faults import FAULT_ONCE_ENV, FAULT_RANK_ENV, FAULT_STEP_ENV

from test_train import TINY, _run

LOCAL = ["--local-steps", "3", "--error-feedback", "--outer-momentum", "0.9"]


def _job(tmp: Path, name: str, optimizer: str, *flags: str, env: dict[str, str] | None = None) -> Any:
    cmd = [
        sys.executable,
        "-m",
        "dlion",
        "train",
        "--optimizer",
        optimizer,
        *TINY,
        *flags,
        "--out",
        str(tmp / name),
    ]
    return _run(cmd, env=env)


def _report(tmp: Path, name: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((tmp / name / "report.json").read_text())
    return report


@pytest.mark.parametrize(
    ("optimizer", "workers", "flags"),
    [
        ("dlion-local", 3, LOCAL),
        pytest.param("diloco", 2, ["--local-steps", "2"], marks=pytest.mark.slow),  # CI: test_diloco.py
    ],
)
def test_virtual_workers_equal_processes_bit_for_bit(
    tmp_path: Path, optimizer: str, workers: int, flags: list[str]
) -> None:
    for name, how in (("real", "--workers"), ("virtual", "--virtual-workers")):
        proc = _job(tmp_path, name, optimizer, how, str(workers), *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
    real, virtual = _report(tmp_path, "real"), _report(tmp_path, "virtual")
    if optimizer == "dlion-local":
        _assert_same_run(real, virtual)
    else:
        # A thread rank's forward and backward can differ from a process's in the last bit (its
        # intra-op threads); sign steps absorb that, AdamW does not (adamw-global alike).
        assert virtual["step_bytes"] == real["step_bytes"] and virtual["rounds"] == real["rounds"]
        assert virtual["final_val_loss"] == pytest.approx(real["final_val_loss"], rel=1e-4)
    # 5 steps at H = 3 (2 for DiLoCo): the last round is partial, ended by the job.
    assert real["rounds"] == (2 if optimizer == "dlion-local" else 3)
    assert real["params_identical_across_ranks"] is True
    sent = [s for s, _ in real["step_bytes"]]
    h = 3 if optimizer == "dlion-local" else 2
    assert [s > 0 for s in sent] == [(k + 1) % h == 0 or k == 4 for k in range(5)]


def test_a_run_killed_in_the_middle_of_a_round_resumes_to_the_unbroken_runs_bits(tmp_path: Path) -> None:
    """H = 3, a checkpoint at step 2 (one step before the round ends), rank 1 killed at step 3:
    the resumed run ends with the unbroken run's parameters, losses and validation."""
    every = ["--workers", "2", *LOCAL, "--checkpoint-every", "2"]
    whole = _job(tmp_path, "whole", "dlion-local", *every, "--checkpoint-dir", str(tmp_path / "whole-ckpt"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    ckpt = tmp_path / "ckpt"
    fault = {FAULT_RANK_ENV: "1", FAULT_STEP_ENV: "3", FAULT_ONCE_ENV: str(tmp_path / "fired")}
    broken = _job(tmp_path, "resumed", "dlion-local", *every, "--checkpoint-dir", str(ckpt), env=fault)
    assert broken.returncode != 0 and "injected fault on rank 1 at step 3" in broken.stderr
    resumed = _job(tmp_path, "resumed", "dlion-local", *every, "--checkpoint-dir", str(ckpt), env=fault)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _report(tmp_path, "whole"), _report(tmp_path, "resumed")
    assert b["resumed_from_step"] == 2
    assert b["param_sha256"] == a["param_sha256"]
    assert b["train_loss"] == a["train_loss"] and b["val_loss"] == a["val_loss"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizer", "adamw-global", "--outer-lr", "2"], "outer_lr is an option of"),
        (["--optimizer", "diloco", "--error-feedback"], "error_feedback is an option of dlion-local"),
        (["--optimizer", "dlion-local", "--local-steps", "0"], "local_steps"),
    ],
)
def test_local_step_flags_are_refused_where_they_mean_nothing(flags: list[str], message: str) -> None:
    proc = _run([sys.executable, "-m", "dlion", "train", *TINY, "--workers", "2", *flags])
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
