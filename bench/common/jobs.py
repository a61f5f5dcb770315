"""Training runs as benchmark jobs: each a `dlion train` (or `python -m launch.cluster`) command whose
report lands in a folder of its own. A job whose report exists is not run again, so a long
benchmark can be stopped and continued where it was."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dlion.train.report import REPORT_FILE
from dlion.worker.catalogue import voting

JOB_TIMEOUT_S = 3600.0
# The votes give the same parameters on every backend (tested bit for bit); the sharded one
# sends the fewest bits, so that is the one benchmarks run them on.
VOTE_BACKEND = "sharded"


@dataclass(frozen=True)
class Job:
    label: str  # how progress and errors name the run
    argv: list[str]
    out: Path  # the run's report folder (the command's --out)

    @property
    def report(self) -> Path:
        return self.out / REPORT_FILE


def train_argv(flags: Sequence[str], *, workers: int, out: Path, rate: str | None = None) -> list[str]:
    """`dlion train --workers N`, or with ``rate``, `python -m launch.cluster` with one worker per
    emulated host on links of that rate, so wall time includes a shaped network."""
    tail = [*flags, "--out", str(out)]
    if rate is None:
        return [sys.executable, "-m", "dlion", "train", "--workers", str(workers), *tail]
    hosts = ["--hosts", str(workers), "--procs-per-host", "1", "--rate", rate]
    return [sys.executable, "-m", "launch.cluster", *hosts, *tail]


def backend_flags(optimizer: str) -> list[str]:
    """The voting optimizers on VOTE_BACKEND; the others have no backend to choose."""
    return ["--backend", VOTE_BACKEND] if optimizer in voting() else []


def run_jobs(jobs: Sequence[Job], timeout_s: float = JOB_TIMEOUT_S) -> list[Path]:
    """Run every job without a report, in order; the report paths, in job order."""
    for i, job in enumerate(jobs, 1):
        if job.report.exists():
            continue
        started = time.monotonic()
        print(f"[{i}/{len(jobs)}] {job.label}", flush=True)
        proc = subprocess.run(
            job.argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
        )
        if proc.returncode != 0:
            raise RuntimeError(f"run {job.label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        print(f"    {proc.stdout.strip().splitlines()[-1]} ({time.monotonic() - started:.0f} s)", flush=True)
    return [job.report for job in jobs]
