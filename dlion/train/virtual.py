"""``--virtual-workers N``: the whole job in one process, one thread per worker.

Each virtual rank runs the training loop as a process would (its own batches, model copy,
momentum, coins and ledger) and talks through ``dlion.transport.threads``: the optimizers,
the vote and the report are the real ones, so a virtual run's parameters equal those of N
processes bit for bit. Ranks take turns on the cores, so a step costs about N workers'
compute: research on many workers, not a way to train faster.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch

from dlion.train import dist as tdist
from dlion.train.config import TrainConfig
from dlion.transport.threads import ThreadGroup

BACKEND = "threads"  # the report's dist_backend for a virtual run


def contexts(group: ThreadGroup) -> list[tdist.DistContext]:
    n, cpu = group.world_size, torch.device("cpu")
    return [tdist.DistContext(r, n, r, n, cpu, BACKEND, False, c) for r, c in enumerate(group.comms)]


def check_alone() -> None:
    """Raise ValueError when launched as one of several processes."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world != "1":
        raise ValueError(
            f"--virtual-workers runs every worker in one process, but WORLD_SIZE={world}; "
            "start it as one process (dlion train --virtual-workers N)"
        )


def run_virtual(
    cfg: TrainConfig, train: Callable[[tdist.DistContext], dict[str, Any] | None]
) -> dict[str, Any]:
    """``train`` (the loop of one rank) on ``cfg.virtual_workers`` ranks of this process;
    rank 0's report."""
    tdist.set_thread_counts(1)  # the ranks take turns, so each may use every core
    group = ThreadGroup(cfg.virtual_workers, timedelta(seconds=cfg.timeout_s))
    ctxs = contexts(group)
    try:
        reports = group.run(lambda rank: train(ctxs[rank]))
    finally:
        group.close()
    report = reports[0]
    assert report is not None  # rank 0 writes the report
    return report
