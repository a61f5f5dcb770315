"""The soak bench: its checks catch growth, and a short soak of the real job passes them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.soak import check_ranks, ledger_consistent


def _resources(rss: list[int], fds: list[int], threads: list[int]) -> dict[str, object]:
    steps = [10 * (i + 1) for i in range(len(rss))]
    return {"steps": steps, "rss_bytes": [rss], "fds": [fds], "threads": [threads]}


def test_checks_catch_memory_descriptor_and_thread_growth() -> None:
    # 100 steps: the warm-up ends at step 20, the second sample; the rise before it is allowed.
    flat = check_ranks(_resources([100, 200, 204, 203, 202], [9] * 5, [4] * 5), steps=100)
    assert flat[0].ok and flat[0].rss_warm == 200 and flat[0].rss_max_after == 204
    assert not check_ranks(_resources([100, 100, 100, 106], [9] * 4, [4] * 4), steps=40)[0].ok
    assert not check_ranks(_resources([100] * 4, [9, 9, 10, 11], [4] * 4), steps=40)[0].ok
    assert not check_ranks(_resources([100] * 4, [9] * 4, [4, 4, 5, 5]), steps=40)[0].ok
    with pytest.raises(ValueError, match="need samples after the warm-up"):
        check_ranks(_resources([100], [9], [4]), steps=10)
    ledger = {"bytes_sent": 23, "bytes_received": 40, "one_off_bytes_sent": 3, "one_off_bytes_received": 0}
    report = {"step_bytes": [[10, 20], [10, 20]], "ledger": ledger}
    assert ledger_consistent(report)
    ledger["bytes_sent"] = 24
    assert not ledger_consistent(report)


def test_short_soak_of_the_job_holds_steady(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.soak", "--steps", "150", "--workers", "2"]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert proc.returncode == 0, (summary, proc.stderr[-2000:])
    assert summary["ok"] and summary["ledger_consistent"] and len(summary["ranks"]) == 2
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["resources"]["steps"]) == 30 and report["resources"]["steps"][-1] == 150
    assert all(v > 10_000_000 for v in report["resources"]["rss_bytes"][1])  # real figures, not -1
