"""The ``dlion`` command.

    dlion train --workers N --optimizer NAME [--steps ...] [--out DIR] [train flags]
    dlion report RUN_DIR... [--out DIR]

``dlion train`` runs the training job (``python -m dlion.train``) on N local processes
joined by Gloo (dlion.run.local), or with ``--transport mpi`` on as many ranks under
mpiexec (dlion.run.mpi); ``--server dedicated`` adds one process, the parameter server.
The other engines start the same job themselves: torchrun (``torchrun -m dlion.train``),
Ray (``launch/ray_job.py``) and the emulated cluster (``launch/cluster.py``), from a
checkout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dlion.report.cli import main as report_main
from dlion.run.local import launch_local
from dlion.run.mpi import launch_mpi
from dlion.train.args import add_train_arguments, config_from_args
from dlion.train.output import check_out, out_dir
from dlion.worker.catalogue import default_workers, entry

DEFAULT_WORKERS = 4


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its ``train`` subparser (which reports its own errors)."""
    parser = argparse.ArgumentParser(prog="dlion", description="Distributed Lion: 1-bit distributed training")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train on N local worker processes",
        description="Train a model with N local workers joined by a Gloo process group (or MPI ranks "
        "under mpiexec); writes OUT/report.json.",
    )
    train.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"local worker processes (default: 1 for a single-process optimizer, else {DEFAULT_WORKERS})",
    )
    add_train_arguments(train)
    sub.add_parser("report", help="turn RUN_DIR/report.json files into a Markdown table and PNG plots")
    return parser, train


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `report ...` hands every later argument, --help included, to the report tool.
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    parser, train = _parsers()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
        if cfg.virtual_workers and args.workers not in (None, 1):
            raise ValueError(
                f"--workers {args.workers} and --virtual-workers {cfg.virtual_workers}: virtual "
                "workers run in one process; give one of the two"
            )
        workers = cfg.virtual_workers or default_workers(cfg.optimizer, args.workers, DEFAULT_WORKERS)
        entry(cfg.optimizer).check_world_size(workers, "--workers")
    except ValueError as e:
        train.error(str(e))
    try:  # the report's folder, before any process starts
        check_out(out_dir(cfg, workers), overwrite=cfg.overwrite)
    except ValueError as e:
        train.error(str(e))
    if cfg.virtual_workers:
        return launch_local(1, cfg.to_argv())
    # A dedicated parameter server is one process more than the workers: the last rank.
    processes = workers + (1 if cfg.server == "dedicated" else 0)
    if cfg.transport == "mpi":
        try:
            return launch_mpi(processes, cfg.to_argv())
        except FileNotFoundError as e:
            train.error(str(e))
    server_rank = workers if cfg.server == "dedicated" else None
    return launch_local(processes, cfg.to_argv(), server_rank=server_rank)
