"""The DDP benchmark's small mode on this machine's loopback: every variant trains, DDP's fp32
all-reduce moves its cost model's bytes, and the dlion hook moves the ledger's, 20x and more fewer."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import own_loopback


@pytest.fixture
def quiet_loopback() -> Iterator[list[str]]:
    """A network namespace of the test's own where it can make one (its loopback carries only
    the benchmark), else nothing: the machine's loopback."""
    with own_loopback("dlion-bddp") as (ns, _):
        yield [] if ns is None else ["ip", "netns", "exec", ns]


@pytest.mark.timeout(600)
def test_small_local_run(tmp_path: Path, quiet_loopback: list[str]) -> None:
    cmd = [*quiet_loopback, sys.executable, "-m", "bench.ddp", "--small", "--local", "--hosts", "2"]
    proc = subprocess.run(
        [*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((tmp_path / "ddp.json").read_text())["rows"]}
    assert set(rows) == {"ddp-fp32", "ddp-powersgd-r1", "ddp-powersgd-r4", "ddp-dlion", "dlion"}
    n = rows["ddp-fp32"]["n_params"]
    fp32 = rows["ddp-fp32"]["wire_bytes_per_rank_step"]
    assert 4 * n <= fp32 <= 1.1 * 4 * n  # N = 2: a ring all-reduce sends (N-1)/N x 2 x 4 bytes a parameter
    for variant in ("ddp-dlion", "dlion"):
        r = rows[variant]
        assert r["ledger_bytes_per_rank_step"] <= r["wire_bytes_per_rank_step"], r
        assert r["fewer_than_fp32"] > 10, r  # small model: headers and the per-step barrier weigh
    assert rows["ddp-dlion"]["ledger_bytes_per_rank_step"] == rows["dlion"]["ledger_bytes_per_rank_step"]
    assert "| DDP + dlion.attach (sharded vote) |" in proc.stdout
