"""User scripts exit 0. Gloo's worker thread used to be the last owner of a finished collective
and destroy it, decref'ing Python tensors, while the interpreter was shutting down: the thread
was ended mid-destructor and the process aborted ("terminate called without an active
exception"), 3 launches in 25 of a plain 3-rank DistributedLion script. The transport now keeps
its last works, so the main thread is their last owner.

CI runs a few launches (DLION_EXIT_LAUNCHES, default 4 per mode); the full check is 50."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("exit_script.py")
LAUNCHES = int(os.environ.get("DLION_EXIT_LAUNCHES", "4"))


@pytest.mark.timeout(60 + 30 * LAUNCHES)
@pytest.mark.parametrize("mode", ["plain", "attach"])
def test_a_user_script_exits_zero_every_time(mode: str) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3"]
    failed = []
    for launch in range(LAUNCHES):
        proc = subprocess.run(
            [*torchrun, str(SCRIPT), mode],
            capture_output=True,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if proc.returncode != 0:
            failed.append((launch, proc.returncode, proc.stderr[-1500:]))
    assert failed == [], failed
