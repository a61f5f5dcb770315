"""An emulated multi-host cluster on one machine: H namespaces, each link shaped to a rate.

    python -m launch.cluster --hosts 4 --procs-per-host 1 --rate 1gbit [train flags]

Each host (launch.netns) runs one torchrun agent with K workers (``python -m
dlion.train``). The agents meet by torchrun's static rendezvous at host 0's address, with
node rank = host index, so global rank h*K + l always runs on host h. The master port is
fixed: every namespace has a port space of its own, and only this run's processes are in
them, so nothing else can hold the port. Gloo binds to each host's eth0, so traffic between
hosts crosses the shaped veth links, and ranks of one host talk over its loopback.

The launcher reads every host's interface counters before and after the job and adds them
to rank 0's report beside the optimizer's byte ledger, so the ledger's cost model is checked
against what the kernel carried. The first host to fail stops the others and is named;
the whole job is bounded by ``--time-limit-s``; the network is removed on every exit path
(Ctrl-C and SIGTERM included; ``--cleanup`` removes what a SIGKILLed run left behind).

``run_on_hosts(HostJob(...))`` is the same machinery for another module on the hosts (the
communication benchmark's ranks, ``bench.netcomm``): it returns the exit status and
every host's counters, and leaves reports to the caller.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dlion.run.local import POLL_S, Interrupted, raise_interrupted, read_failure, stop_processes
from dlion.train.args import add_train_arguments, config_from_args
from dlion.train.config import TrainConfig, check_float, check_int
from dlion.train.dist import ERROR_FILE_ENV, INIT_METHOD_ENV, share_cores
from dlion.train.report import write_report
from dlion.worker.catalogue import entry
from launch.netns import (
    IFNAME,
    EmulatedNetwork,
    HostCounters,
    NetnsError,
    NetSpec,
    namespaces_unavailable,
    pid_alive,
    remove_stale,
)
from launch.netreport import format_table, network_section

_SCRATCH_PREFIX = "dlion-cluster-"  # + the launcher's pid: --cleanup knows a dead run's folder
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
MASTER_PORT = 29500  # inside host 0's private namespace: cannot clash (see the module docstring)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    net: NetSpec
    procs_per_host: int
    time_limit_s: float
    train: TrainConfig  # out resolved: the launcher reads the report from it


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The cluster's flags, then every training flag (``dlion.train.args``)."""
    a = parser.add_argument
    a("--hosts", type=int, default=4, help="emulated hosts, a network namespace each (default: %(default)s)")
    a("--procs-per-host", type=int, default=1, help="worker processes per host (default: %(default)s)")
    a(
        "--rate",
        default="1gbit",
        help="each link's rate each way: 100mbit, 1gbit, 10gbit (default: %(default)s)",
    )
    a("--burst-bytes", type=int, default=None, help="tbf bucket (default: 1 ms at the rate, >= 256 KiB)")
    a("--subnet", default="10.77.0.0/24", help="the hosts' private addresses (default: %(default)s)")
    a("--time-limit-s", type=float, default=1800.0, help="bound on the whole job (default: %(default)s)")
    a("--cleanup", action="store_true", help="only remove what killed dlion runs left behind, then exit")
    add_train_arguments(parser)


def cluster_config_from_args(args: argparse.Namespace) -> ClusterConfig:
    """Validate everything before anything is created; ValueError names the bad value."""
    net = NetSpec(hosts=args.hosts, rate=args.rate, burst_bytes=args.burst_bytes, subnet=args.subnet)
    k = args.procs_per_host
    check_int("procs_per_host", k, low=1)
    check_float("time_limit_s", args.time_limit_s, low=0.0, low_open=True)
    train = config_from_args(args)
    if train.transport != "torch":
        raise ValueError(
            f"the emulated cluster runs torchrun: transport must be 'torch', got {train.transport!r}"
        )
    entry(train.optimizer).check_world_size(net.hosts * k, "hosts x procs_per_host =")
    if train.out is None:
        train = dataclasses.replace(train, out=f"runs/cluster-{train.optimizer}-h{net.hosts}x{k}")
    return ClusterConfig(net=net, procs_per_host=k, time_limit_s=float(args.time_limit_s), train=train)


def run_cluster(args: argparse.Namespace) -> int:
    """Run the job of parsed ``args`` (see add_cluster_arguments); the exit status.

    Raises ValueError, naming the value, for invalid arguments, before anything is created.
    """
    if not args.cleanup:
        return launch_cluster(cluster_config_from_args(args))
    reason = namespaces_unavailable()
    if reason is not None:
        print(f"launch.cluster: cannot clean up: {reason}", file=sys.stderr)
        return 1
    removed = remove_leftovers()
    print(f"launch.cluster: removed {len(removed)} leftover(s)" + "".join(f"\n  {n}" for n in removed))
    return 0


def remove_leftovers() -> list[str]:
    """What runs killed by SIGKILL left: their namespaces and links, and their scratch folders."""
    removed = remove_stale()
    for path in sorted(Path(tempfile.gettempdir()).glob(f"{_SCRATCH_PREFIX}*")):
        owner = path.name[len(_SCRATCH_PREFIX) :].partition("-")[0]
        if owner.isdigit() and not pid_alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def launch_cluster(cfg: ClusterConfig) -> int:
    start_time = time.time()
    job = HostJob(
        net=cfg.net, procs_per_host=cfg.procs_per_host, time_limit_s=cfg.time_limit_s,
        module="dlion.train", argv=tuple(cfg.train.to_argv()),
    )  # fmt: skip
    run = run_on_hosts(job)
    if run.code != 0:
        return run.code
    path = Path(str(cfg.train.out), "report.json")
    if not path.exists() or path.stat().st_mtime < start_time:
        print(f"launch.cluster: every host succeeded but rank 0 wrote no {path}", file=sys.stderr)
        return 1
    report = json.loads(path.read_text())
    report["network"] = network_section(cfg.net, cfg.procs_per_host, run.counters, report, run.wall_s)
    write_report(report, path.parent)
    print(f"{format_table(report['network'])}\nreport with the network section: {path}", flush=True)
    return 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostJob:
    """What runs on the emulated hosts: on each, one torchrun agent of ``procs_per_host``
    workers, each ``python -m <module> <argv>`` (the cluster job runs ``dlion.train``)."""

    net: NetSpec
    procs_per_host: int
    time_limit_s: float
    module: str
    argv: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_int("procs_per_host", self.procs_per_host, low=1)
        check_float("time_limit_s", self.time_limit_s, low=0.0, low_open=True)
        if not isinstance(self.module, str) or not self.module:
            raise ValueError(f"module must name a Python module, got {self.module!r}")


@dataclasses.dataclass(frozen=True)
class HostsRun:
    """How a HostJob ended: ``code`` 0 when every host succeeded, and then ``counters``, each
    host's interface counters after the job minus before (empty otherwise)."""

    code: int
    counters: list[HostCounters]
    wall_s: float  # network creation to removal


def run_on_hosts(job: HostJob) -> HostsRun:
    """Build the network, run ``job`` on every host, remove the network (on every exit path).

    A failure is printed, naming the host and the rank (workers that call
    ``dlion.train.dist.record_failure`` are named with their error), and its exit status returned.
    """
    reason = namespaces_unavailable()
    if reason is not None:
        print(f"launch.cluster: cannot emulate hosts on this machine: {reason}", file=sys.stderr)
        return HostsRun(1, [], 0.0)
    net = EmulatedNetwork(job.net)
    agents: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-") as tmp,
        _handling(_STOP_SIGNALS[1:], raise_interrupted),  # SIGINT raises KeyboardInterrupt already
    ):
        try:
            net.create()
            before = net.counters()
            agents = [_start_agent(job, net, h, Path(tmp)) for h in range(job.net.hosts)]
            outcome = _supervise(agents, Path(tmp), job, started + job.time_limit_s)
            after = net.counters() if outcome is None else []
        except (KeyboardInterrupt, Interrupted) as e:
            print(f"launch.cluster: interrupted ({e or 'SIGINT'}); stopping the hosts", file=sys.stderr)
            return HostsRun(130 if isinstance(e, KeyboardInterrupt) else 128 + e.signum, [], 0.0)
        except NetnsError as e:
            print(f"launch.cluster: the emulated network failed: {e}", file=sys.stderr)
            return HostsRun(1, [], 0.0)
        finally:
            with _handling(_STOP_SIGNALS, signal.SIG_IGN):  # a second Ctrl-C must not cut it short
                stop_processes(agents)
                problems = net.destroy() + [f"{n} survived removal" for n in net.leftovers()]
            for problem in problems:
                print(f"launch.cluster: cleaning up: {problem}", file=sys.stderr)
    if outcome is not None:
        print(f"launch.cluster: {outcome[0]}", file=sys.stderr, flush=True)
        return HostsRun(outcome[1], [], time.monotonic() - started)
    delta = [a - b for a, b in zip(after, before, strict=True)]
    return HostsRun(0, delta, time.monotonic() - started)


def _start_agent(job: HostJob, net: EmulatedNetwork, host: int, scratch: Path) -> subprocess.Popen[bytes]:
    """Host ``host``'s torchrun agent, inside its namespace, pinned to its share of the cores."""
    spec, k = job.net, job.procs_per_host
    cpus = host_cpus(host, spec.hosts)
    env = dict(os.environ)
    env.pop(INIT_METHOD_ENV, None)  # it would win over torchrun's MASTER_ADDR
    env["GLOO_SOCKET_IFNAME"] = IFNAME
    # One environment for all of torchrun's workers: each expands {rank} to a file of its own,
    # so the launcher can name the rank that failed first.
    env[ERROR_FILE_ENV] = str(scratch / "error-rank{rank}.json")
    env["PYTHONUNBUFFERED"] = "1"
    share_cores(env, k, len(cpus))
    cmd = [
        *net.exec_prefix(host), sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(spec.hosts), "--nproc-per-node", str(k), "--node-rank", str(host),
        "--master-addr", spec.address(0), "--master-port", str(MASTER_PORT),
        "--max-restarts", "0", "--monitor-interval", "0.1",
        "-m", job.module, *job.argv,
    ]  # fmt: skip
    # A child inherits its parent thread's affinity at fork: it never runs unpinned.
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        return subprocess.Popen(cmd, env=env)
    finally:
        os.sched_setaffinity(0, saved)


def host_cpus(host: int, hosts: int) -> list[int]:
    """The cores of ``host``: an equal share, or one shared core when hosts outnumber cores.

    Each worker sizes its thread pool by its CPU affinity; unpinned, every emulated host
    would take every core and the ranks would oversubscribe them.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if hosts > len(cpus):
        return [cpus[host % len(cpus)]]
    share = len(cpus) // hosts
    return cpus[host * share : (host + 1) * share]


def _supervise(
    agents: list[subprocess.Popen[bytes]], scratch: Path, job: HostJob, deadline: float
) -> tuple[str, int] | None:
    """None when every host succeeds; else (a message naming the host, the exit status)."""
    k, stopped = job.procs_per_host, "the other hosts were stopped"
    while True:
        codes = [a.poll() for a in agents]
        failed = [(h, c) for h, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            host, code = failed[0]
            assert code is not None
            # A fault on one rank breaks the others' connections: the earliest error file is the cause.
            ranks = [r for r in range(len(agents) * k) if (scratch / f"error-rank{r}.json").exists()]
            if not ranks:
                return f"host {host} ({job.net.address(host)}): torchrun exited with {code}; {stopped}", code
            seen = time.time()
            first = min((read_failure(r, code, scratch, seen) for r in ranks), key=lambda f: (f.time, f.rank))
            host = first.rank // k
            return f"host {host} ({job.net.address(host)}): {first.describe()}; {stopped}", code
        if all(c == 0 for c in codes):
            return None
        if time.monotonic() > deadline:
            running = ", ".join(str(h) for h, c in enumerate(codes) if c is None)
            return f"the job exceeded --time-limit-s {job.time_limit_s:g} (hosts running: {running})", 124
        time.sleep(POLL_S)


@contextmanager
def _handling(signals: tuple[signal.Signals, ...], handler: Any) -> Iterator[None]:
    """Set ``handler`` for ``signals`` inside the block (only the main thread may)."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, handler) for s in signals} if main else {}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.cluster",
        description="Train on H emulated hosts (network namespaces on a bridge, links shaped by tc tbf) and "
        "add each host's interface bytes beside the ledger's to OUT/report.json. Needs root.",
    )
    add_cluster_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_cluster(args)
    except ValueError as e:
        parser.error(str(e))
    raise AssertionError("unreachable: parser.error exits")


if __name__ == "__main__":
    sys.exit(main())
