"""The emulated multi-host cluster: ledger bytes against the kernel's interface counters.

The real runs need root and iproute2; elsewhere they are skipped with the reason that
``namespaces_unavailable()`` gives, never passed. Every run checks that nothing named
after it survives: namespaces, the bridge, veth ends.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from launch import cluster as netcluster
from launch import netreport
from launch.netns import (
    EmulatedNetwork,
    HostCounters,
    NetSpec,
    namespaces_unavailable,
    parse_counters,
    parse_rate,
)

# Default model (0.84M parameters): 8 sharded-vote steps move ~0.84 MB per rank each way, enough
# that headers and the fixed exchanges (rendezvous, connection set-up, the report's gathers) stay
# near 3% of it (measured 2.9%).
SMALL = ["--steps", "8", "--eval-every", "8", "--eval-batches", "1", "--data-bytes", "300000"]
TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--context", "32", "--batch-size", "4"]
RUN_TIMEOUT_S = 80


@functools.cache
def _unavailable() -> str | None:
    return namespaces_unavailable()


@pytest.fixture
def namespaces() -> None:
    reason = _unavailable()
    if reason is not None:
        pytest.skip(f"emulated hosts need network namespaces: {reason}")


def _launch(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "launch.cluster", "--time-limit-s", "70", "--out", str(out), *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        netcluster.remove_leftovers()
        pytest.fail(f"the launcher outlived {RUN_TIMEOUT_S} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _leftovers(pid: int) -> list[str]:
    """Namespaces and links named after launcher ``pid``'s runs."""
    mine = re.compile(rf"^(?:dlion-{pid}[a-z]-h\d+|dln{pid}[a-z](?:br|[vp]\d+))$")
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    return [n for n in [*names, *os.listdir("/sys/class/net")] if mine.match(n)]


def _wait_for_agents(pid: int, hosts: int) -> None:
    """Until launcher ``pid`` has a network of ``hosts`` namespaces with a process in the last one."""
    deadline = time.monotonic() + 30
    last = re.compile(rf"^dlion-{pid}[a-z]-h{hosts - 1}$")  # the one-host probe has only h0
    while True:
        for name in (n for n in _leftovers(pid) if last.match(n)):
            if subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
                return
        assert time.monotonic() < deadline, "the launcher started no hosts within 30 s"
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_ledger_matches_interface_bytes(namespaces: None, tmp_path: Path) -> None:
    proc = _launch(tmp_path, "--hosts", "2", "--optimizer", "dlion-mavo", "--backend", "sharded", *SMALL)
    code, out, err = _finish(proc)
    assert code == 0, err[-3000:]
    assert "iface tx MB" in out
    report = json.loads((tmp_path / "report.json").read_text())
    net = report["network"]
    assert (net["hosts"], net["procs_per_host"], net["rate"]) == (2, 1, "1gbit")
    assert [h["ranks"] for h in net["per_host"]] == [[0], [1]]
    for h in net["per_host"]:
        ledger = report["ledger_by_rank"][h["host"]]
        assert h["ledger_bytes_sent"] == ledger["bytes_sent"] > 500_000
        # The interface carries the payload plus headers and the run's fixed exchanges: never
        # less, and within 5% in both directions.
        for ratio in (h["tx_over_ledger_sent"], h["rx_over_ledger_received"]):
            assert 1.0 <= ratio < 1.05, (h, net["note"])
    assert net["totals"]["interface_tx_bytes"] == sum(h["interface_tx_bytes"] for h in net["per_host"])
    assert report["params_identical_across_ranks"]
    assert _leftovers(proc.pid) == []


@pytest.mark.timeout(120)
def test_failing_rank_is_named_by_host_and_cleaned_up(namespaces: None, tmp_path: Path) -> None:
    proc = _launch(
        tmp_path, "--hosts", "2", *TINY, *SMALL, env={"DLION_FAULT_RANK": "1", "DLION_FAULT_STEP": "1"}
    )
    code, _, err = _finish(proc)
    assert code != 0
    assert "host 1 (10.77.0.2): worker rank 1 failed" in err and "injected fault on rank 1" in err, err[
        -3000:
    ]
    assert not (tmp_path / "report.json").exists()
    assert _leftovers(proc.pid) == []


@pytest.mark.timeout(60)
def test_sigterm_stops_the_job_and_removes_the_network(namespaces: None, tmp_path: Path) -> None:
    proc = _launch(tmp_path, "--hosts", "3", *TINY, "--steps", "1000")
    _wait_for_agents(proc.pid, 3)
    proc.send_signal(signal.SIGTERM)
    code, _, err = _finish(proc)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted (SIGTERM)" in err
    assert _leftovers(proc.pid) == []


@pytest.mark.timeout(60)
def test_cleanup_removes_what_a_killed_run_left(namespaces: None, tmp_path: Path) -> None:
    proc = _launch(tmp_path, "--hosts", "2", *TINY, "--steps", "1000")
    _wait_for_agents(proc.pid, 2)
    proc.kill()  # SIGKILL: no chance to clean up; its hosts' processes run on, orphaned
    proc.wait(timeout=10)
    left = _leftovers(proc.pid)
    assert len(left) >= 3  # two namespaces and the bridge at least
    scratch = list(Path(tempfile.gettempdir()).glob(f"dlion-cluster-{proc.pid}-*"))
    assert len(scratch) == 1
    removed = netcluster.remove_leftovers()  # also stops the orphans, so their pipes close
    _finish(proc)
    assert set(left) | {str(scratch[0])} <= set(removed)
    assert _leftovers(proc.pid) == [] and not scratch[0].exists()


def test_network_is_removed_even_when_creation_fails(namespaces: None) -> None:
    net = EmulatedNetwork(NetSpec(hosts=2))
    # A taken name makes the second namespace fail after the bridge and first host exist.
    subprocess.run(["ip", "netns", "add", net.namespace(1)], check=True)
    try:
        with pytest.raises(RuntimeError, match=re.escape(net.namespace(1))), net:
            pass
        assert net.leftovers() == []
    finally:
        subprocess.run(["ip", "netns", "del", net.namespace(1)], check=False)


# Input validation and pure helpers: no namespaces needed.


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"hosts": 0}, "hosts must be an int in [1, 64], got 0"),
        ({"hosts": 65}, "got 65"),
        ({"hosts": True}, "got True"),
        ({"hosts": 2, "rate": "1gbps"}, "got '1gbps'"),
        ({"hosts": 2, "rate": "fast"}, "e.g. 1gbit"),
        ({"hosts": 2, "rate": "50kbit"}, "between 100kbit and 100gbit, got '50kbit'"),
        ({"hosts": 2, "rate": "200gbit"}, "got '200gbit'"),
        ({"hosts": 2, "burst_bytes": 100}, "burst_bytes must be an int in [1500"),
        ({"hosts": 2, "subnet": "10.77.0.1/24"}, "10.77.0.1/24"),
        ({"hosts": 2, "subnet": "8.8.8.0/24"}, "private"),
        ({"hosts": 4, "subnet": "10.0.0.0/30"}, "each of 4 hosts"),
    ],
)
def test_netspec_rejects_bad_values(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        NetSpec(**kwargs)  # type: ignore[arg-type]


def test_rates_addresses_and_burst() -> None:
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("10GBit") == 10**10
    assert parse_rate("2.5gbit") == 2_500_000_000
    assert parse_rate("100mbit") == 10**8
    spec = NetSpec(hosts=3, rate="10gbit")
    assert [spec.address(h) for h in range(3)] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert spec.burst == 1_250_000  # 1 ms at 10 Gbit/s
    assert NetSpec(hosts=1).burst == 256 * 1024


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    netcluster.add_cluster_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--procs-per-host", "0"], "procs_per_host must be an int >= 1, got 0"),
        (["--time-limit-s", "0"], "time_limit_s"),
        (["--time-limit-s", "inf"], "time_limit_s"),
        (["--transport", "mpi"], "transport must be 'torch'"),
        (["--optimizer", "lion", "--hosts", "2"], "'lion' is single-process"),
        (["--hosts", "99"], "hosts must be an int in [1, 64], got 99"),
        (["--steps", "0"], "steps"),
    ],
)
def test_cluster_arguments_are_validated_first(argv: list[str], needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        netcluster.cluster_config_from_args(_args(*argv))


def test_cli_reports_bad_values_without_building_anything(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        netcluster.main(["--rate", "1gbps"])
    assert e.value.code == 2
    assert "rate must be" in capsys.readouterr().err


def test_config_defaults() -> None:
    cfg = netcluster.cluster_config_from_args(_args("--optimizer", "adamw-global"))
    assert (cfg.net.hosts, cfg.procs_per_host, cfg.net.rate) == (4, 1, "1gbit")
    assert cfg.train.out == "runs/cluster-adamw-global-h4x1"
    assert "--out" in cfg.train.to_argv()


def test_host_cpus_partition_the_cores() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert netcluster.host_cpus(0, 1) == cpus
    shares = [netcluster.host_cpus(h, len(cpus)) for h in range(len(cpus))]
    assert shares == [[c] for c in cpus]
    many = len(cpus) + 3
    assert all(len(netcluster.host_cpus(h, many)) == 1 for h in range(many))


def test_counters_parsing() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs ...\n"
        "    lo:     100       2    0    0    0     0          0         0      100    2 0 0 0 0 0 0\n"
        "  eth0: 5000 40 0 0 0 0 0 0 7000 50 0 0 0 0 0 0\n"
        "Ip: Forwarding DefaultTTL\n"
        "Ip: 1 64\n"
        "Tcp: RtoAlgorithm RtoMin ActiveOpens RetransSegs InErrs\n"
        "Tcp: 1 200 3 17 0\n"
    )  # fmt: skip
    assert parse_counters(text, "eth0") == HostCounters(5000, 40, 7000, 50, 17)
    with pytest.raises(RuntimeError, match="eth1"):
        parse_counters(text, "eth1")
    with pytest.raises(RuntimeError, match="TCP"):
        parse_counters(text.split("Ip:")[0], "eth0")


def test_network_section_sums_ranks_per_host() -> None:
    cfg = netcluster.cluster_config_from_args(_args("--hosts", "2", "--procs-per-host", "2"))
    ledgers = [{"bytes_sent": 100 * (r + 1), "bytes_received": 50} for r in range(4)]
    delta = [HostCounters(120, 2, 330, 3, 1), HostCounters(80, 1, 0, 0, 0)]
    report = {"ledger_by_rank": ledgers, "server_ledger": None}
    net = netreport.network_section(cfg.net, cfg.procs_per_host, delta, report, 1.5)
    h0, h1 = net["per_host"]
    assert (h0["ranks"], h0["ledger_bytes_sent"], h0["ledger_bytes_received"]) == ([0, 1], 300, 100)
    assert h0["tx_over_ledger_sent"] == pytest.approx(1.1)
    assert h1["tx_over_ledger_sent"] == 0.0 and h1["rx_over_ledger_received"] == pytest.approx(0.8)
    assert net["totals"]["ledger_bytes_sent"] == 1000 and net["totals"]["interface_tx_bytes"] == 330
    assert net["totals"]["tcp_retransmitted_segments"] == 1
    assert "loopback" in net["note"]
    table = netreport.format_table(net)
    assert "tx/sent" in table and "1.1000" in table and table.splitlines()[-1].split()[0] == "all"
    json.dumps(net)  # the report stays plain JSON
    # The hierarchical backend's bytes inside a node cross the loopback: out of the ledger column.
    for r in ledgers:
        r.update(node_bytes_sent=60, node_bytes_received=20)
    hier = netreport.network_section(cfg.net, cfg.procs_per_host, delta, report, 1.5)
    h0 = hier["per_host"][0]
    assert (h0["ledger_bytes_sent"], h0["ledger_bytes_received"]) == (180, 60)


def test_unavailable_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from launch import netns

    monkeypatch.setattr(netns.shutil, "which", lambda tool: None)
    assert namespaces_unavailable() == "`ip` (iproute2) is not on PATH"
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    reason = namespaces_unavailable()
    assert reason is not None and "need root" in reason and "uid 1000" in reason
