"""The communication benchmark's small mode: the ledger equals docs/design.md's cost model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.comm.driver import BenchConfig
from bench.comm.launch import find_mpiexec
from bench.comm.model import FP32, Variant, bucket_bytes, expected_bytes


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("comm")
    cmd = [sys.executable, "-m", "bench.comm", "--small", "--out", str(out), "--timeout", "150"]
    env = {**os.environ, "NUMBA_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "comm.md").read_text().count("| torch |") == 18
    assert (out / "comm_bytes.png").stat().st_size > 0
    return json.loads((out / "comm.json").read_text())


def _row(report: dict, transport: str, n: int, variant: str) -> dict:
    key = (transport, n, variant)
    return next(r for r in report["rows"] if (r["transport"], r["n"], r["variant"]) == key)


def test_every_row_matches_the_cost_model(report: dict) -> None:
    assert report["rows"]
    for r in report["rows"]:
        assert r["ledger_ok"], r
        assert (r["sent"], r["received"]) == (r["model_sent"], r["model_received"]), r


def test_sharded_majority_beats_allgather_and_fp32(report: dict) -> None:
    sharded = _row(report, "torch", 4, "sharded majority")
    allgather = _row(report, "torch", 4, "allgather majority")
    fp32 = _row(report, "torch", 4, FP32.label)
    assert sharded["sent"] < allgather["sent"]
    assert fp32["sent"] > 31 * sharded["sent"]
    assert sharded["bytes_ratio"] > 31


def test_mpi_rows_match_torch(report: dict) -> None:
    if find_mpiexec() is None:
        pytest.skip("needs mpi4py and an mpiexec: pip install -e '.[dev]' brings the Open MPI wheel")
    mpi = [r for r in report["rows"] if r["transport"] == "mpi"]
    assert {r["n"] for r in mpi} == {2}
    for r in mpi:
        torch_row = _row(report, "torch", 2, r["variant"])
        assert (r["sent"], r["received"]) == (torch_row["sent"], torch_row["received"])


def test_cost_model_by_hand() -> None:
    # 3 tensors: 2 + 1 + 13 bytes of sign bits = 16 bytes; sharded pads to 16 N bytes.
    numels = [9, 8, 100]
    assert bucket_bytes(numels, 1 << 25, 16) == [16]
    assert bucket_bytes(numels, 1 << 25, 64) == [64]
    assert bucket_bytes(numels, 100, 16) == [16, 16]  # the third tensor opens a new bucket
    meta = 3 * (4 + 1)
    sharded = Variant(label="s", optimizer="dlion", backend="sharded", vote="average")
    assert expected_bytes(sharded, numels, 4, 1 << 25, rank=0).sent == meta + 3 * 16 * (1 + 3)
    assert expected_bytes(FP32, numels, 4, 1 << 25, rank=0).sent == meta + 2 * 3 * 4 * 120 // 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"params": 0}, "--params must be an int >= 1, got 0"),
        ({"sizes": (2, 1)}, "every N must be an int >= 2, got 1"),
        ({"transports": ("nccl",)}, "'nccl' is not one of torch, mpi"),
        ({"steps": 0}, "--steps must be an int >= 1, got 0"),
    ],
)
def test_bad_config_is_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        BenchConfig(**kwargs)


def test_cli_refuses_bad_params(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.comm", "--params", "0", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    assert "--params must be an int >= 1, got 0" in proc.stderr
