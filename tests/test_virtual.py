"""Virtual workers: N ranks as threads of one process, bit for bit the N-process job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from dlion.transport import CollectiveTimeout
from dlion.transport.threads import ThreadGroup

from test_train import TINY, _run


def _job(tmp_path: Path, name: str, optimizer: str, *flags: str) -> dict[str, Any]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "dlion", "train", "--optimizer", optimizer, *TINY, *flags, "--out", str(out)]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def _assert_same_run(real: dict[str, Any], virtual: dict[str, Any]) -> None:
    assert virtual["config"]["virtual_workers"] == real["config"]["world_size"]
    assert virtual["config"]["world_size"] == real["config"]["world_size"]
    assert virtual["config"]["dist_backend"] == "threads"
    assert virtual["param_sha256"] == real["param_sha256"]
    assert virtual["params_identical_across_ranks"] is True
    for key in ("train_loss", "train_loss_mean_by_rank", "val_loss", "step_bytes", "ledger_by_rank"):
        assert virtual[key] == real[key], key


VOTES = ["dlion-mavo", "dlion-avg", "signum-mavo", "dlion-sto"]
# CI runs dlion-mavo and dlion-sto (its own encoder) at N = 3; -m slow runs them all.
CASES = [
    pytest.param(o, n, marks=[] if n == 3 and o in ("dlion-mavo", "dlion-sto") else [pytest.mark.slow])
    for o in VOTES
    for n in (2, 3, 4)
]


@pytest.mark.parametrize(("optimizer", "workers"), CASES)
def test_virtual_workers_equal_processes_bit_for_bit(tmp_path: Path, optimizer: str, workers: int) -> None:
    real = _job(tmp_path, "real", optimizer, "--workers", str(workers))
    virtual = _job(tmp_path, "virtual", optimizer, "--virtual-workers", str(workers))
    _assert_same_run(real, virtual)


def test_collectives_of_thread_ranks() -> None:
    group = ThreadGroup(3, timedelta(seconds=10))
    comms = group.comms

    def work(r: int) -> dict[str, torch.Tensor | None]:
        c = comms[r]
        summed = torch.full((4,), float(r + 1))
        c.all_reduce_sum(summed, "sum")
        return {
            "gather": c.all_gather(torch.tensor([r, 10 * r]), "gather"),
            "a2a": c.all_to_all(torch.arange(6) + 100 * r, "a2a"),
            "bcast": c.broadcast(torch.tensor([r * 7]), 2, "bcast"),
            "root": c.gather(torch.tensor([r]), 1, "root"),
            "sum": summed,
        }

    out = group.run(work)
    group.close()
    for r, got in enumerate(out):
        assert got["gather"].tolist() == [[0, 0], [1, 10], [2, 20]]  # type: ignore[union-attr]
        # Rank j's shard for rank r is elements 2r, 2r+1 of j's send.
        assert got["a2a"].tolist() == [[2 * r + 100 * j, 2 * r + 1 + 100 * j] for j in range(3)]  # type: ignore[union-attr]
        assert got["bcast"].tolist() == [14]  # type: ignore[union-attr]
        assert (got["root"] is not None) == (r == 1)
        assert got["sum"].tolist() == [6.0] * 4  # type: ignore[union-attr]


def test_a_failing_rank_stops_its_peers_at_once() -> None:
    group = ThreadGroup(3, timedelta(seconds=60))

    def work(r: int) -> None:
        if r == 1:
            raise ValueError("rank 1 broke")
        group.comms[r].all_gather(torch.zeros(1), "waiting for rank 1")

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="rank 1 broke"):
        group.run(work)
    assert time.monotonic() - t0 < 10  # not the 60 s timeout
    group.close()


def test_a_rank_that_never_arrives_times_out_naming_the_collective() -> None:
    group = ThreadGroup(2, timedelta(seconds=0.5))

    def work(r: int) -> None:
        if r == 0:  # rank 1 returns without joining
            group.comms[0].all_gather(torch.zeros(1), "metadata all_gather")

    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout, match="metadata all_gather"):
        group.run(work)
    assert time.monotonic() - t0 < 10
    group.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--workers", "3", "--virtual-workers", "2"], "give one of the two"),
        (["--virtual-workers", "2", "--transport", "mpi"], "virtual workers talk through threads"),
        (["--virtual-workers", "-1"], "virtual_workers must be an int >= 0"),
    ],
)
def test_cli_refuses_virtual_workers_it_cannot_run(flags: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dlion", "train", *flags], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_worker_refuses_virtual_workers_among_processes() -> None:
    proc = _run(
        [sys.executable, "-m", "dlion.train", "--virtual-workers", "2", *TINY],
        env={"WORLD_SIZE": "2", "RANK": "0"},
    )
    assert proc.returncode == 1 and "WORLD_SIZE=2" in proc.stderr, proc.stderr
