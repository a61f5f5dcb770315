"""The ``dlion`` command.

    dlion train --workers N --optimizer NAME [--steps ...] [--out DIR] [train flags]
    dlion cluster --hosts H --procs-per-host K --rate 1gbit [train flags]
    dlion bench PART [--small] ...      (kernels, comm, netcomm, convergence, project, byzantine, soak, gpu)
    dlion report RUN_DIR... [--out DIR]

``--workers`` local processes run ``python -m dlion.train`` (see dlion.launch.local), or,
with ``--transport mpi``, as many ranks under mpiexec (dlion.launch.mpi). ``--server
dedicated`` adds one process, the parameter server. ``dlion cluster`` runs the job on H
emulated hosts joined by rate-limited links (dlion.launch.netcluster; needs root).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from dlion.launch.local import launch_local
from dlion.launch.mpi import launch_mpi
from dlion.launch.netcluster import add_cluster_arguments, run_cluster
from dlion.train.config import add_train_arguments, config_from_args
from dlion.train.loop import LOCAL_OPTIMIZERS

DEFAULT_WORKERS = 4
# `dlion bench PART`: the module whose main() runs it.
BENCH_PARTS = {
    "kernels": "dlion.bench.kernels",
    "comm": "dlion.bench.comm",
    "netcomm": "dlion.bench.netcomm",
    "convergence": "dlion.bench.convergence",
    "project": "dlion.bench.project",
    "byzantine": "dlion.bench.byzantine",
    "soak": "dlion.bench.soak",
    "gpu": "dlion.bench.gpu",
}


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``train`` and ``cluster`` subparsers (each reports its errors)."""
    parser = argparse.ArgumentParser(
        prog="dlion", description="Distributed Lion: 1-bit distributed training."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a byte-level transformer on N local workers",
        description="Train a byte-level transformer on the Python standard library with N local workers "
        "joined by a Gloo process group; writes OUT/report.json.",
    )
    train.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"local worker processes (default: 1 for {', '.join(sorted(LOCAL_OPTIMIZERS))}, "
        f"else {DEFAULT_WORKERS})",
    )
    add_train_arguments(train)
    cluster = sub.add_parser(
        "cluster",
        help="train on H emulated hosts: network namespaces on a bridge, links shaped by tc tbf (root)",
        description="Train on H emulated hosts (network namespaces joined by a bridge, each link limited "
        "by tc tbf), K torchrun workers per host; adds each host's interface bytes beside the ledger's "
        "to OUT/report.json and removes the network on every exit. Needs root.",
    )
    add_cluster_arguments(cluster)
    bench = sub.add_parser(
        "bench",
        help=f"benchmarks: {', '.join(BENCH_PARTS)} (each takes --small and --help)",
        description="Run one benchmark; the arguments after PART go to it (`dlion bench PART --help`).",
    )
    bench.add_argument(
        "part", choices=sorted(BENCH_PARTS), metavar="PART", help=", ".join(sorted(BENCH_PARTS))
    )
    sub.add_parser("report", help="turn RUN_DIR/report.json files into a Markdown table and PNG plots")
    return parser, train, cluster


def _run_module(module: str, argv: list[str]) -> int:
    code: int = importlib.import_module(module).main(argv)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bench PART ...` and `report ...` hand every later argument, --help included, to the tool.
    if argv[:1] == ["report"]:
        return _run_module("dlion.bench.runs", argv[1:])
    if argv[:1] == ["bench"] and len(argv) > 1 and argv[1] in BENCH_PARTS:
        return _run_module(BENCH_PARTS[argv[1]], argv[2:])
    parser, train, cluster = _parsers()
    args = parser.parse_args(argv)
    if args.command == "cluster":
        try:
            return run_cluster(args)
        except ValueError as e:
            cluster.error(str(e))
    workers = args.workers
    if workers is None:
        workers = 1 if args.optimizer in LOCAL_OPTIMIZERS else DEFAULT_WORKERS
    if workers < 1:
        train.error(f"--workers must be >= 1, got {workers}")
    if args.optimizer in LOCAL_OPTIMIZERS and workers != 1:
        train.error(
            f"optimizer {args.optimizer!r} is single-process and needs --workers 1, got --workers {workers}; "
            "use lion-global or dlion-mavo for several workers"
        )
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        train.error(str(e))
    # A dedicated parameter server is one process more than the workers: the last rank.
    processes = workers + (1 if cfg.server == "dedicated" else 0)
    if cfg.transport == "mpi":
        try:
            return launch_mpi(processes, cfg.to_argv())
        except FileNotFoundError as e:
            train.error(str(e))
    server_rank = workers if cfg.server == "dedicated" else None
    return launch_local(processes, cfg.to_argv(), server_rank=server_rank)
