"""The sharded benchmark (bench.sharded): its small mode on this machine's loopback trains every
variant and counts their memory and bytes, HSDP + DistributedLion holding 1/S of DDP + attach's
momentum; on emulated hosts (root, slow), each host's interface carries the ledger's bytes
across replicas within 10%, and none of FSDP's traffic inside the host."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import own_loopback

from bench.sharded.driver import ShardedBenchConfig
from bench.sharded.rank import VARIANTS
from bench.sharded.report import agreement


@pytest.fixture
def quiet_loopback() -> Iterator[list[str]]:
    """A network namespace of the test's own where it can make one (its loopback carries only
    the benchmark), else nothing: the machine's loopback."""
    with own_loopback("dlion-bshd") as (ns, _):
        yield [] if ns is None else ["ip", "netns", "exec", ns]


def _run(cmd: list[str], out: Path, timeout: float) -> tuple[subprocess.CompletedProcess[str], dict]:
    proc = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    saved = out / "sharded.json"
    return proc, json.loads(saved.read_text()) if saved.exists() else {}


@pytest.mark.timeout(120)
def test_small_local_run(tmp_path: Path, quiet_loopback: list[str]) -> None:
    cmd = [*quiet_loopback, sys.executable, "-m", "bench.sharded", "--small", "--local"]
    proc, report = _run(cmd, tmp_path, timeout=100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == set(VARIANTS) and all(r["topology"] == "2x2" for r in rows.values())
    for r in rows.values():
        for key in ("param_bytes", "grad_bytes", "state_bytes", "step_ms"):
            assert r[key] > 0, (r["variant"], key)
        assert min(r["iface_bytes_per_host_step"]) > 0, r
    for variant in ("ddp-dlion", "hsdp-dlion"):
        assert min(rows[variant]["ledger_net_bytes_per_host_step"]) > 0
    assert min(rows["hsdp-dlion"]["ledger_node_bytes_per_host_step"]) > 0  # FSDP's, counted under attach
    # Sharded over S = 2 ranks: half the parameters, gradients and momentum of a DDP rank.
    s = 2
    for key in ("param_bytes", "grad_bytes", "state_bytes"):
        assert rows["hsdp-dlion"][key] == pytest.approx(rows["ddp-dlion"][key] / s, rel=0.02), key
    # The same model, batches and AdamW: DDP, FSDP and HSDP differ only in how gradients meet.
    last = rows["ddp-fp32"]["loss_first_last"][1]
    for variant in ("fsdp-adamw", "hsdp-adamw"):
        assert rows[variant]["loss_first_last"][1] == pytest.approx(last, rel=1e-4)
    assert "| HSDP + DistributedLion (dlion.attach) |" in proc.stdout


def test_config_names_the_bad_value() -> None:
    with pytest.raises(ValueError, match="--hosts must list ints >= 2"):
        ShardedBenchConfig(hosts=(1, 2))
    with pytest.raises(ValueError, match="--d-model must be a multiple of 4"):
        ShardedBenchConfig(d_model=30)
    with pytest.raises(ValueError, match="rate must be"):
        ShardedBenchConfig(rate="fast")


def test_agreement_is_per_host() -> None:
    row = {
        "topology": "2x2", "variant": "hsdp-dlion", "iface_bytes_per_host_step": [1050.0, 1200.0],
        "iface_packets_per_host_step": [1.0, 2.0], "ledger_net_bytes_per_host_step": [1000.0, 1000.0],
        "lo_bytes_per_host_step": [30.0, 30.0], "ledger_node_bytes_per_host_step": [20.0, 20.0],
    }  # fmt: skip
    check = agreement(row)
    assert check["ratios"] == [1.05, 1.2] and not check["ok"]  # one host off is a failure
    assert check["ratios_less_headers"] == [0.984, 1.068] and check["lo_over_node"] == [1.5, 1.5]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_emulated_hosts_interface_matches_the_ledger(tmp_path: Path) -> None:
    from launch.netns import namespaces_unavailable

    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"emulated hosts need network namespaces: {reason}")
    proc, report = _run([sys.executable, "-m", "bench.sharded", "--steps", "5"], tmp_path, timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = {c["topology"]: c for c in report["agreement"]}
    assert set(checks) == {"2x2", "4x2"}
    for c in checks.values():
        assert c["ok"] and all(0.9 <= x <= 1.1 for x in c["ratios"]), c
    for r in (r for r in report["rows"] if r["variant"] == "hsdp-dlion"):
        # FSDP's all-gathers and reduce-scatters stay on each host's loopback: ~60x the vote's
        # bytes, none of them on its interface.
        keys = ("iface_bytes_per_host_step", "lo_bytes_per_host_step", "ledger_node_bytes_per_host_step")
        for eth0, lo, node in zip(*(r[k] for k in keys), strict=True):
            assert lo >= node > 20 * eth0, r
