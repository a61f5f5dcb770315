"""What a rank holds while it trains: resident memory, open file descriptors, threads.

Sampled on every rank at each validation step and gathered into the report, so any run
shows whether memory, descriptors or threads grow with the step count (the soak bench,
bench.soak, checks that they do not). Linux reads /proc; elsewhere a figure it
cannot read is -1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dlion.train.dist import DistContext, all_gather_rows

FIELDS = ("rss_bytes", "fds", "threads")


def sample() -> tuple[int, int, int]:
    """(resident set size in bytes, open file descriptors, threads) of this process."""
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = -1
    try:
        fds = len(os.listdir("/proc/self/fd")) - 1  # less the descriptor listdir itself opened
    except OSError:
        fds = -1
    threads = -1
    try:
        with open("/proc/self/status") as f:
            threads = next((int(line.split()[1]) for line in f if line.startswith("Threads:")), -1)
    except OSError:
        pass
    return rss, fds, threads


@dataclass
class ResourceLog:
    """This rank's samples, one per sampled step."""

    steps: list[int] = field(default_factory=list)
    rows: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, step: int) -> None:
        self.steps.append(step)
        self.rows.append(sample())

    def gather(self, ctx: DistContext) -> dict[str, Any]:
        """Every rank's samples (ranks sample at the same steps): {"steps": [...], field:
        [[rank 0's values], [rank 1's], ...]} for each of FIELDS."""
        flat = torch.tensor([v for row in self.rows for v in row], dtype=torch.int64)
        per_rank = all_gather_rows(ctx, flat).reshape(-1, len(self.rows), len(FIELDS))
        return {"steps": list(self.steps)} | {
            name: per_rank[:, :, i].tolist() for i, name in enumerate(FIELDS)
        }
