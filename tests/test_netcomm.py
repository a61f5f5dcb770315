"""The emulated-cluster communication benchmark: its small run, its cost model, its arguments.

The run needs root and iproute2 (network namespaces); elsewhere it is skipped with the
reason ``namespaces_unavailable()`` gives. The rest needs nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.netcomm import driver as netcomm
from bench.netcomm.model import BASELINE, CASES, HEADLINE, MIN_PARAMS, Case, expected, tensor_shapes
from bench.netcomm.report import Row, bytes_table, headlines, time_table
from launch.netns import namespaces_unavailable

RUN_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"emulated hosts need network namespaces: {reason}")
    out = tmp_path_factory.mktemp("netcomm")
    cmd = [sys.executable, "-m", "bench.netcomm", "--small", "--out", str(out), "--time-limit-s", "120"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"the small benchmark outlived {RUN_TIMEOUT_S} s:\n{stderr[-3000:]}")
    finally:
        left = _leftovers(proc.pid)
    assert left == [], f"the benchmark left {left}"
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads((out / "netcomm.json").read_text()), out, stdout


def _leftovers(pid: int) -> list[str]:
    """Namespaces and links named after launcher ``pid``'s networks (launch.netns's names)."""
    mine = re.compile(rf"^(?:dlion-{pid}[a-z]-h\d+|dln{pid}[a-z](?:br|[vp]\d+))$")
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    return [n for n in [*names, *os.listdir("/sys/class/net")] if mine.match(n)]


def _row(report: dict, size: int, case: Case) -> dict:
    return next(r for r in report["rows"] if (r["size"], r["case"]) == (size, case.label))


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_small_run(small: tuple[dict, Path, str]) -> None:
    report, out, stdout = small
    sizes = netcomm.SMALL["sizes"]
    assert {(r["rate"], r["size"], r["case"]) for r in report["rows"]} == {
        ("1gbit", s, c.label) for s in sizes for c in CASES
    }
    for r in report["rows"]:
        # Every rank's every step after the first equals the cost model; the worker's row says so.
        assert r["ledger_ok"], r
        assert (r["sent"], r["received"]) == (r["model_sent"], r["model_received"]), r
        assert len(r["ms_steps"]) == netcomm.SMALL["steps"] and r["ms"] > 0
    big = max(sizes)
    sharded, adamw = _row(report, big, HEADLINE), _row(report, big, BASELINE)
    assert adamw["sent"] + adamw["received"] >= 20 * (sharded["sent"] + sharded["received"])
    assert sharded["bytes_ratio"] > 31
    # The traffic crossed the shaped links: each host's eth0 carried the ledger's bytes plus
    # headers and the barriers (under 10% at 1M parameters).
    for r in (sharded, adamw):
        assert 1.0 <= r["iface_tx"] / r["sent"] < 1.1, r
        assert 1.0 <= r["iface_rx"] / r["received"] < 1.1, r
    (launch,) = report["launches"]
    assert [h["host"] for h in launch["hosts"]] == [0, 1, 2, 3]
    assert all(h["iface_tx_bytes"] > h["ledger_sent"] * 0.5 for h in launch["hosts"])
    assert "dlion-mavo sharded step" in stdout and "ledger == cost model" in stdout
    assert (out / "netcomm.md").read_text().count("| 1gbit |") == len(sizes) * len(CASES)
    assert (out / "netcomm.png").stat().st_size > 10_000


def test_shapes_add_up_and_stay_odd() -> None:
    for total in (MIN_PARAMS, 100_000, 1_000_000, 25_000_000, 100_000_000):
        shapes = tensor_shapes(total)
        assert sum(math.prod(s) for s in shapes) == total
        matrices = [s for s in shapes if len(s) == 2]
        assert len(matrices) == 4 and all(r % 2 == 1 and c % 2 == 1 for r, c in matrices)
        vectors = sum(math.prod(s) for s in shapes if len(s) == 1)
        assert 0 < vectors <= max(total // 100, 8 * 1023)  # DGC's dense part stays small
    with pytest.raises(ValueError, match="model size must be an int >= 8,184, got 100"):
        tensor_shapes(100)


def test_cost_model_by_hand() -> None:
    shapes = tensor_shapes(1_000_000)
    meta = 3 * (4 + 1)  # 6 tensors: 1 byte of presence flags
    adamw = expected(BASELINE, shapes, 4, rank=0)
    assert adamw.sent == meta + 2 * 3 * 4 * 1_000_000 // 4
    sharded = expected(HEADLINE, shapes, 4, rank=0)
    assert 31.9 < (adamw.sent - meta) / (sharded.sent - meta) <= 32.0
    # TernGrad all-gathers 2-bit codes: (N-1) x d/4 bytes, plus the scalers.
    tern = expected(Case("terngrad", "allgather"), shapes, 4, rank=0)
    assert tern.sent - meta - 3 * 4 * 8 == 3 * 250_016
    # DGC's server: a worker receives the dense fp32 average; the server sends it N-1 times.
    worker, server = (expected(Case("dgc", "server"), shapes, 4, rank=r) for r in (1, 0))
    assert worker.received == meta + 4_000_000 and server.sent == meta + 3 * 4_000_000


def _rows() -> list[Row]:
    def row(case: Case, ms: float, sent: int) -> Row:
        return Row(
            rate="1gbit", size=25_000_000, case=case.label, ms=ms, ms_steps=(ms,), sent=sent, received=sent,
            model_sent=sent, model_received=sent, ledger_ok=True, iface_tx=None, iface_rx=None,
            tcp_resent=None, iface_by_host=None, speedup=1200.0 / ms, bytes_ratio=150_000_000 / sent,
        )  # fmt: skip

    return [row(BASELINE, 1200.0, 150_000_000), row(HEADLINE, 60.0, 4_687_500)]


def test_tables() -> None:
    rows = _rows()
    assert "| dlion-mavo sharded | 60.0 ms (20.0x) |" in time_table(rows)
    assert "| 25M @ 1gbit |" in time_table(rows)
    assert "4,687,500 / 4,687,500 (32.0x) | yes |" in bytes_table(rows)
    lines = headlines(rows)
    assert lines[0].startswith(
        "- 25M parameters at 1gbit: dlion-mavo sharded step 60.0 ms vs adamw-global 1,200.0"
    )
    assert "20.0x faster" in lines[0] and lines[-1].endswith("yes")


def test_arguments() -> None:
    cfg = netcomm.config_from_args(netcomm.build_parser().parse_args(["--small", "--rates", "10gbit"]))
    assert (cfg.rates, cfg.sizes, cfg.steps, cfg.hosts) == (("10gbit",), (100_000, 1_000_000), 2, 4)
    cfg = netcomm.config_from_args(netcomm.build_parser().parse_args(["--sizes", "1e6, 25_000_000"]))
    assert (cfg.rates, cfg.sizes, cfg.steps) == (("1gbit", "10gbit"), (1_000_000, 25_000_000), 5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hosts", "1"], "--hosts must be an int >= 2 (one host has no network), got 1"),
        (["--rates", "1gbps"], "got '1gbps'"),
        (["--rates", "1gbit,1gbit"], "--rates lists a value twice"),
        (["--sizes", "25M"], "--sizes: '25M' is not a number of parameters"),
        (["--sizes", "2.5"], "--sizes: '2.5' is not a whole, positive number"),
        (["--sizes", "1000"], "a model size must be an int >= 8,184, got 1000"),
        (["--sizes", ","], "--sizes needs at least one value"),
        (["--steps", "0"], "--steps must be an int >= 1, got 0"),
        (["--warmup", "0"], "--warmup must be an int >= 1, got 0"),
        (["--cases", "adamw"], "unknown case 'adamw'"),
        (["--time-limit-s", "0"], "--time-limit-s must be > 0"),
    ],
)
def test_bad_arguments_are_named(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        netcomm.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
