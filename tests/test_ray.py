"""Ray Train: `ray job submit` of launch.ray_job on a local cluster this test starts and stops.

One run covers the issue's checks: a worker fails once after the first checkpoint, Ray's
FailureConfig restarts the worker group, every rank restores its own momentum, and the
result equals an unbroken local run bit for bit. The cluster is this test's own
(LocalRayCluster), never `ray stop`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlion.train.checkpoint import rank_file
from dlion.train.faults import FAULT_ONCE_ENV, FAULT_RANK_ENV, FAULT_STEP_ENV

from test_train import TINY, _run

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="needs Ray Train: pip install -e '.[ray]'"
)
JOB_TIMEOUT_S = 420
FLAGS = [*TINY, "--checkpoint-every", "2", "--optimizer", "dlion-mavo"]


@needs_ray
@pytest.mark.timeout(JOB_TIMEOUT_S + 120)
def test_ray_job_submit_restarts_and_restores_each_ranks_momentum(tmp_path: Path) -> None:
    from launch.ray_cluster import LocalRayCluster

    local = _run(
        [sys.executable, "-m", "dlion", "train", "--workers", "2", *FLAGS, "--out", str(tmp_path / "l")]
    )
    assert local.returncode == 0, local.stderr[-3000:]
    storage, out = tmp_path / "storage", tmp_path / "ray"
    fault = {FAULT_RANK_ENV: "1", FAULT_STEP_ENV: "3", FAULT_ONCE_ENV: str(tmp_path / "fired")}
    with LocalRayCluster(num_cpus=4) as cluster:
        cmd = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--working-dir", "."]
        cmd += ["--runtime-env-json", json.dumps({"env_vars": fault}), "--"]
        cmd += [sys.executable, "-m", "launch.ray_job", "--workers", "2", "--max-failures", "1"]
        cmd += ["--name", "t", "--storage-path", str(storage), *FLAGS, "--out", str(out)]
        cli = str(Path(sys.executable).with_name("ray"))
        proc = subprocess.run(
            [cli, *cmd[1:]],
            capture_output=True,
            text=True,
            timeout=JOB_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).parents[1],
        )
        leftovers = cluster
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert leftovers.leftover_pids() == []  # the cluster is gone, and only it was stopped
    assert "injected fault on rank 1 at step 3" in proc.stdout + proc.stderr
    # Each progress line once (Ray Train's print patch would also log it to stderr): step 1
    # ran before the fault, step 5 after the restart.
    for line in ("step 1/5 ", "step 5/5 "):
        assert (proc.stdout + proc.stderr).count(line) == 1, line

    report = json.loads((out / "report.json").read_text())
    ref = json.loads((tmp_path / "l" / "report.json").read_text())
    assert report.keys() == ref.keys()  # the same report as `dlion train`
    assert report["resumed_from_step"] == 2  # restarted from the step-2 checkpoint
    assert report["param_sha256"] == ref["param_sha256"]  # momentum restored per rank, not averaged
    assert report["val_loss"] == ref["val_loss"] and report["train_loss"] == ref["train_loss"]

    result = json.loads((out / "ray_result.json").read_text())
    metrics = result["metrics"]  # rank 0's, attached to the last checkpoint
    assert metrics["step"] == 5 and metrics["val_loss"] == report["final_val_loss"]
    assert metrics["bytes_sent"] == report["ledger"]["bytes_sent"] > 0
    last = Path(result["checkpoint"])
    assert last.parent == storage / "t" and last.name == "step-00000005"
    saved = [torch.load(last / rank_file(r), weights_only=True) for r in (0, 1)]
    assert [s["rank"] for s in saved] == [0, 1] and all(s["step"] == 5 for s in saved)
    m0, m1 = (s["optimizer"]["state"][0]["exp_avg"] for s in saved)
    assert not torch.equal(m0, m1)  # each rank's own momentum


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0, got -1.0"),
        (["--cpus-per-worker", "0"], "--cpus-per-worker must be > 0, got 0.0"),
        (["--max-failures", "-2"], "--max-failures must be >= -1, got -2"),
        (["--transport", "mpi"], "--transport mpi: not under Ray"),
        (["--backend", "server", "--server", "dedicated"], "--server dedicated: not under Ray"),
        (["--checkpoint-dir", "/tmp/x"], "--checkpoint-dir /tmp/x: not under Ray"),
        (["--steps", "0"], "steps must be an int >= 1, got 0"),
    ],
)
def test_ray_job_refuses_bad_flags_before_touching_ray(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from launch.ray_job import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
