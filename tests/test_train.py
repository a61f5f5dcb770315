"""The main job end to end (launcher, workers, report) and its data and model parts."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dlion.train.args import parse_config
from dlion.train.config import TrainConfig
from dlion.train.data import BatchSampler, CorpusConfig, eval_batches, load_corpus
from dlion.train.faults import FAULT_KIND_ENV, FAULT_RANK_ENV, FAULT_STEP_ENV
from dlion.train.job import warmup_cosine
from dlion.train.model import ByteGPT, ModelConfig
from dlion.worker.catalogue import OPTIMIZER_NAMES, entry

TINY = [
    "--steps", "5", "--d-model", "32", "--layers", "1", "--heads", "2", "--context", "32",
    "--batch-size", "4", "--data-bytes", "200000", "--eval-every", "2", "--eval-batches", "2",
    "--timeout-s", "60",
]  # fmt: skip
JOB_TIMEOUT_S = 90


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env={**os.environ, **(env or {})}
    )


def _train(tmp_path: Path, workers: int, optimizer: str, *extra: str) -> dict[str, Any]:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlion", "train", "--workers", str(workers), "--optimizer", optimizer]
    proc = _run([*cmd, *TINY, *extra, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def _check_common(report: dict[str, Any], workers: int, optimizer: str) -> None:
    cfg = report["config"]
    assert cfg["optimizer"] == optimizer and cfg["world_size"] == workers and cfg["steps"] == 5
    assert cfg["torch_version"] == torch.__version__ and cfg["dlion_version"]
    assert len(report["train_loss"]) == 5 and all(math.isfinite(v) for v in report["train_loss"])
    assert [s for s, _ in report["val_loss"]] == [0, 2, 4, 5]
    assert report["final_val_loss"] == report["val_loss"][-1][1] and math.isfinite(report["final_val_loss"])
    assert report["params_identical_across_ranks"] is True
    assert len(set(report["param_sum_by_rank"])) == 1
    assert len(report["ledger_by_rank"]) == workers and report["ledger"] == report["ledger_by_rank"][0]
    assert report["n_params"] == report["ledger"]["n_params"] > 0
    assert len(report["step_time_s"]) == 5 and report["wall_time_s"] >= report["train_time_s"] > 0


def _check_bytes(report: dict[str, Any]) -> None:
    steps = report["step_bytes"]
    assert len(steps) == 5 and all(sent > 0 and received > 0 for sent, received in steps)
    # The first step also exchanges a parameter fingerprint; after it every step is alike.
    assert all(s == steps[1] for s in steps[1:]) and steps[0][0] >= steps[1][0]
    ledger = report["ledger"]
    assert ledger["steps"] == 5
    # The workers build the model from one seed, so the start sends the fingerprint and one
    # 8-byte checksum per tensor to each other worker, and broadcasts nothing (a broadcast
    # would be 4 bytes per parameter to each).
    broadcast = 4 * report["n_params"] * (report["config"]["world_size"] - 1)
    assert 0 < ledger["one_off_bytes_sent"] < broadcast // 100
    assert ledger["bytes_sent"] == sum(s for s, _ in steps) + ledger["one_off_bytes_sent"]
    # Every rank's steps send alike.
    steps_sent = ledger["bytes_sent"] - ledger["one_off_bytes_sent"]
    assert all(r["bytes_sent"] - r["one_off_bytes_sent"] == steps_sent for r in report["ledger_by_rank"])


def test_dlion_mavo_two_workers(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlion", "train", "--workers", "2", "--optimizer", "dlion-mavo"]
    proc = _run([*cmd, *TINY, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    _check_common(report, 2, "dlion-mavo")
    _check_bytes(report)
    # Two ranks on the default (sharded) backend: about one bit per parameter each way.
    assert report["config"]["backend"] == "sharded"
    up = report["ledger"]["bits_per_param_up"]
    assert 1.0 <= up < 1.1
    # Beside it, fp32 ring all-reduce at N = 2 (32 bits each way) and the ratio, in the report
    # and in the final line.
    assert report["saving"]["fp32_allreduce_bits_per_param"] == 32.0
    assert report["saving"]["fewer_than_fp32"] == pytest.approx(32.0 / up)
    final = proc.stdout.strip().splitlines()[-1]
    assert f"{up:.3f} bits/param up" in final, final
    assert f"fp32 all-reduce: 32.0 each way, {32.0 / up:.1f}x fewer" in final, final


def test_sharded_backend_same_result_fewer_bytes(tmp_path: Path) -> None:
    """Three workers: sharded sends 2 (N-1)/N = 4/3 bits per parameter, not N-1 = 2, and
    votes the same, so validation losses agree exactly with the all-gather run."""
    sharded = _train(tmp_path / "s", 3, "dlion-mavo", "--backend", "sharded")
    gathered = _train(tmp_path / "g", 3, "dlion-mavo", "--backend", "allgather")
    _check_common(sharded, 3, "dlion-mavo")
    _check_bytes(sharded)
    assert sharded["config"]["backend"] == "sharded" and gathered["config"]["backend"] == "allgather"
    assert sharded["val_loss"] == gathered["val_loss"]
    assert sharded["param_sum_by_rank"] == gathered["param_sum_by_rank"]
    assert 4 / 3 <= sharded["ledger"]["bits_per_param_up"] < 1.45
    assert 2.0 <= gathered["ledger"]["bits_per_param_up"] < 2.1


def test_dedicated_parameter_server(tmp_path: Path) -> None:
    """Two workers and a third process that only votes: the same result as the vote on
    rank 0, and the server's own traffic in the report, N times a worker's payload."""
    dedicated = _train(tmp_path / "d", 2, "dlion-mavo", "--backend", "server", "--server", "dedicated")
    on_rank0 = _train(tmp_path / "r", 2, "dlion-mavo", "--backend", "server")
    _check_common(dedicated, 2, "dlion-mavo")
    assert dedicated["config"]["server"] == "dedicated" and on_rank0["server_ledger"] is None
    assert dedicated["val_loss"] == on_rank0["val_loss"]
    server, workers = dedicated["server_ledger"], dedicated["ledger_by_rank"]
    assert server["steps"] == 5
    # The workers start equal (one seed): the start sends checksums (metadata), no payload.
    up = sum(w["sent_bytes_by_kind"]["payload"] for w in workers)
    assert server["received_bytes_by_kind"]["payload"] == up > 0
    down = sum(w["received_bytes_by_kind"]["payload"] for w in workers)
    assert server["sent_bytes_by_kind"]["payload"] == down == up  # majority: 1 bit each way


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py (the mpi extra)")
def test_mpi_transport(tmp_path: Path) -> None:
    """`dlion train --transport mpi` runs the ranks under mpiexec: same votes as Gloo."""
    mpi = _train(tmp_path / "m", 2, "dlion-mavo", "--transport", "mpi", "--backend", "sharded")
    gloo = _train(tmp_path / "g", 2, "dlion-mavo", "--backend", "sharded")
    _check_common(mpi, 2, "dlion-mavo")
    assert mpi["config"]["transport"] == "mpi" and mpi["config"]["dist_backend"] == "mpi"
    assert mpi["val_loss"] == gloo["val_loss"]
    assert mpi["ledger"] == gloo["ledger"]


def test_adamw_global_two_workers(tmp_path: Path) -> None:
    report = _train(tmp_path, 2, "adamw-global")
    _check_common(report, 2, "adamw-global")
    _check_bytes(report)
    # fp32 ring all-reduce with N = 2 sends 2 (N-1)/N * 32 = 32 bits per parameter.
    assert report["ledger"]["bits_per_param_up"] >= 32.0


def test_lion_one_worker(tmp_path: Path) -> None:
    report = _train(tmp_path, 1, "lion")
    _check_common(report, 1, "lion")
    assert report["config"]["dist_backend"] is None  # no process group at all
    assert report["step_bytes"] == [] and report["ledger"]["bytes_sent"] == 0


def test_lion_one_worker_refuses_to_overwrite_a_finished_run(tmp_path: Path) -> None:
    """A second run into a finished run's folder stops before training unless --overwrite."""
    _train(tmp_path, 1, "lion")
    report = tmp_path / "run" / "report.json"
    before = report.read_bytes()
    cmd = [sys.executable, "-m", "dlion", "train", "--optimizer", "lion", *TINY, "--out", str(report.parent)]
    proc = _run(cmd)
    assert proc.returncode == 2 and "already holds a finished run's report.json" in proc.stderr
    assert "--overwrite" in proc.stderr and report.read_bytes() == before
    proc = _run([*cmd, "--overwrite", "--seed", "1"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(report.read_text())["config"]["seed"] == 1


def test_an_unwritable_out_fails_before_any_worker_starts(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for entry_point in (["-m", "dlion", "train", "--workers", "2"], ["-m", "dlion.train"]):
        started = time.monotonic()
        proc = _run([sys.executable, *entry_point, *TINY, "--out", str(blocker / "run")])
        assert proc.returncode != 0 and f"--out {blocker / 'run'} cannot be written" in proc.stderr
        assert "step" not in proc.stdout  # no training line was printed
        assert time.monotonic() - started < 30


def test_default_out_names_what_tells_runs_apart() -> None:
    from dlion.train.output import out_dir

    cfg = parse_config(["--optimizer", "dlion-mavo", "--backend", "server", "--seed", "3"])
    assert str(out_dir(cfg, 4)) == os.path.join("runs", "bytes-dlion-mavo-server-w4-s3")
    cfg = parse_config(["--optimizer", "adamw-global", "--transport", "mpi"])
    assert str(out_dir(cfg, 2)) == os.path.join("runs", "bytes-adamw-global-mpi-w2-s0")
    cfg = parse_config(["--optimizer", "dlion-avg", "--out", "mine"])
    assert str(out_dir(cfg, 2)) == "mine"


def test_torchrun_c10d_rendezvous_gives_the_same_report(tmp_path: Path) -> None:
    """`torchrun --rdzv-backend c10d` runs the entry point unchanged: the report of `dlion train`."""
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "t"]
    cmd += ["-m", "dlion.train", "--optimizer", "dlion-avg"]
    proc = _run([*cmd, *TINY, "--out", str(out)], env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    _check_common(report, 2, "dlion-avg")
    _check_bytes(report)
    assert report["config"]["dist_backend"] == "gloo"  # no GPU here
    local = _train(tmp_path / "local", 2, "dlion-avg")
    assert report.keys() == local.keys()
    assert report["param_sha256"] == local["param_sha256"] and report["ledger"] == local["ledger"]


def test_failing_worker_stops_the_job_and_is_named(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlion", "train", "--workers", "2", "--optimizer", "dlion-mavo"]
    started = time.monotonic()
    proc = _run([*cmd, *TINY, "--out", str(out)], env={FAULT_RANK_ENV: "1"})
    assert proc.returncode != 0
    assert "worker rank 1 failed with exit code 1" in proc.stderr
    assert "injected fault on rank 1" in proc.stderr
    assert time.monotonic() - started < 60  # well inside the 60 s collective timeout + start-up
    assert not (out / "report.json").exists()


def test_killed_worker_is_named_by_the_launcher_and_the_survivors(tmp_path: Path) -> None:
    """SIGKILL on rank 1 mid-run: the launcher names it, not a survivor whose connection broke
    and who wrote an error file about it (test_failures checks what the survivors say)."""
    cmd = [sys.executable, "-m", "dlion", "train", "--workers", "3", "--timeout-s", "10"]
    env = {FAULT_RANK_ENV: "1", FAULT_STEP_ENV: "2", FAULT_KIND_ENV: "kill"}
    started = time.monotonic()
    proc = _run([*cmd, *TINY, "--out", str(tmp_path / "run")], env=env)
    assert proc.returncode != 0
    assert "worker rank 1 was killed by SIGKILL" in proc.stderr, proc.stderr[-3000:]
    assert time.monotonic() - started < 60


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer", "lion", "--workers", "2"], "needs --workers 1"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--steps", "0"], "steps must be an int >= 1, got 0"),
        (["--d-model", "30", "--heads", "4"], "d_model=30 must be divisible by heads=4"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--server", "dedicated"], "server='dedicated' is a parameter-server process"),
        (["--transport", "tcp"], "invalid choice: 'tcp'"),
        (["--optimizer", "adamw-global", "--cautious-wd"], "cautious weight decay is an option of"),
        (["--cautious-wd", "maybe"], "expected true or false, got 'maybe'"),
    ],
)
def test_cli_rejects_bad_arguments(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """In this process: `python -m dlion` is `raise SystemExit(dlion.cli.main())`, and an
    interpreter of its own per case costs seconds of imports for a usage error."""
    from dlion.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", *args])
    assert exited.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("optimizer", "message"),
    [
        ("lion", "optimizer 'lion' runs on one process only, but WORLD_SIZE=2"),
        ("dlion-mavo", "neither MASTER_ADDR"),
    ],
)
def test_worker_refuses_a_world_it_cannot_join(optimizer: str, message: str) -> None:
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "", "DLION_INIT_METHOD": ""}
    env = {k: v for k, v in {**os.environ, **env}.items() if v}  # unset the empty ones
    proc = subprocess.run(
        [sys.executable, "-m", "dlion.train", "--optimizer", optimizer, *TINY],
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S, env=env,
    )  # fmt: skip
    assert proc.returncode == 1 and message in proc.stderr


def test_config_defaults_resolve_per_optimizer() -> None:
    adam = parse_config(["--optimizer", "adamw-global", "--steps", "50"])
    lion = parse_config(["--optimizer", "lion", "--lr", "2e-4"])
    assert adam.lr != lion.lr == 2e-4 and adam.warmup_steps == 5
    # Round trip through the argv the launcher hands to its workers.
    assert parse_config(adam.to_argv()) == adam
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TrainConfig(optimizer="sgd")
    for name in OPTIMIZER_NAMES:  # every optimizer's defaults come from its catalogue row
        cfg = TrainConfig(optimizer=name)
        assert (cfg.lr, cfg.weight_decay) == (entry(name).lr, entry(name).weight_decay) and cfg.lr > 0


def test_data_split_is_deterministic_and_disjoint() -> None:
    cfg = CorpusConfig(max_bytes=300_000)
    a, b = load_corpus(cfg), load_corpus(cfg)
    assert a.train_files == b.train_files and a.val_files == b.val_files and a.sha256 == b.sha256
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.val_files and not set(a.train_files) & set(a.val_files)
    assert a.train.numel() + a.val.numel() == 300_000
    other = load_corpus(CorpusConfig(max_bytes=300_000, split_seed=1))
    assert other.sha256 != a.sha256


def test_batches_are_seeded_per_rank() -> None:
    data = load_corpus(CorpusConfig(max_bytes=100_000)).train

    def draw(seed: int, rank: int) -> torch.Tensor:
        return BatchSampler(data, batch_size=3, context=16, seed=seed, rank=rank).next()[0]

    x, y = BatchSampler(data, batch_size=3, context=16, seed=0, rank=0).next()
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one byte
    assert torch.equal(draw(0, 0), draw(0, 0))
    assert not torch.equal(draw(0, 0), draw(0, 1)) and not torch.equal(draw(0, 0), draw(1, 0))
    batches = eval_batches(data, batch_size=4, context=16, n_batches=3)
    assert len(batches) == 3 and all(xb.shape == (4, 16) for xb, _ in batches)


def test_model_shapes_and_seeded_init() -> None:
    cfg = ModelConfig(context=16, d_model=32, layers=2, heads=4)
    model = ByteGPT(cfg, seed=3)
    idx = torch.randint(0, 256, (2, 16))
    assert model(idx).shape == (2, 16, 256) and model(idx[:, :5]).shape == (2, 5, 256)
    loss = model.loss(idx, idx)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    # Near uniform at init: ln 256 = 5.55 nats.
    assert abs(loss.item() - math.log(256)) < 0.5
    same, other = ByteGPT(cfg, seed=3), ByteGPT(cfg, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), same.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters(), strict=True))
    with pytest.raises(ValueError, match="exceeds the model context"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="heads=3"):
        ModelConfig(d_model=32, heads=3)


def test_warmup_cosine_schedule() -> None:
    f = warmup_cosine(4, 20, 0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(4, 30))


def test_cautious_flag_round_trips_through_the_worker_argv() -> None:
    cfg = parse_config(["--optimizer", "dlion-mavo", "--cautious-wd"])
    assert cfg.cautious_wd is True
    assert parse_config(cfg.to_argv()) == cfg
    assert parse_config([]).cautious_wd is False


def test_launcher_names_a_failed_server_as_the_server() -> None:
    from dlion.run.local import WorkerFailure

    failure = WorkerFailure(rank=2, returncode=1, error="WorkerLost: ...", time=0.0)
    assert failure.describe(server_rank=2).startswith("the parameter server rank 2 failed with exit code 1")
    assert failure.describe().startswith("worker rank 2 failed")


def test_loopback_meeting_points_are_recognised() -> None:
    from dlion.train.dist import is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("10.77.0.1") and not is_loopback("no-such-host.invalid")
