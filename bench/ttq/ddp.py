"""The rows under DistributedDataParallel, as users run them: DDP's fp32 all-reduce overlapped
with backward, and dlion.attach's vote in DDP's hook. (The job's powersgd is already torch's
DDP hook, so it needs no row here.)

Their step times come from ``bench.ddp`` on the same emulated hosts, model shape and batch as
the study's runs; their loss curves are those of the study's row with the same mathematics
(DDP's mean gradient and AdamW are adamw-global's; attach's vote is dlion-mavo's).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.ttq.timing import slowest_rank

WARMUP = 3  # bench.ddp's untimed steps: compilation, DDP's bucket rebuild


@dataclass(frozen=True, kw_only=True)
class DdpRow:
    name: str
    variant: str  # bench.ddp's
    curve: str  # the study row whose convergence run it follows
    timed: int


DDP_ROWS: tuple[DdpRow, ...] = (
    DdpRow(name="adamw-ddp", variant="ddp-fp32", curve="adamw-global", timed=3),
    DdpRow(name="dlion-mavo-ddp", variant="ddp-dlion", curve="dlion-mavo", timed=12),
)
BY_NAME = {r.name: r for r in DDP_ROWS}


def result_path(root: Path, row: DdpRow) -> Path:
    """``root``: the scenario's folder of runs at its rate."""
    return root / "ddp" / f"{row.variant}.json"


def measure(row: DdpRow, path: Path, *, rate: str, burst_bytes: int, model: dict[str, int]) -> None:
    """Run the row's bench.ddp variant on 4 emulated hosts; every rank's record to ``path``."""
    from bench.ddp.driver import DDPBenchConfig, run_variant

    cfg = DDPBenchConfig(hosts=4, rate=rate, burst_bytes=burst_bytes, steps=row.timed, warmup=WARMUP,
                         d_model=model["d_model"], layers=model["layers"], batch=model["batch"])  # fmt: skip
    ranks = run_variant(cfg, row.variant)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ranks))


def step_time(ranks: list[dict[str, Any]]) -> float:
    """The median over timed steps of the slowest rank's step."""
    by_rank = [r["step_s"] for r in ranks]
    return statistics.median(slowest_rank(by_rank, 1, len(by_rank[0]), 1))
