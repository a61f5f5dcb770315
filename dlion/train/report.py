"""The run's JSON report: what was trained, how it went, and what went over the wire."""

from __future__ import annotations

import json
import math
import platform
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from dlion.ledger import KINDS, saving
from dlion.train.dist import DistContext, all_gather_rows

# Ledger summary numbers gathered from every rank, in this order.
_SUMMARY_KEYS = (
    "steps",
    "n_params",
    "bytes_sent",
    "bytes_received",
    "one_off_bytes_sent",
    "one_off_bytes_received",
    "bits_per_param_up",
    "bits_per_param_down",
    "node_bytes_sent",
    "node_bytes_received",
    "node_bits_per_param_up",
    "node_bits_per_param_down",
)
_KIND_KEYS = KINDS
REPORT_FILE = "report.json"
_INT_KEYS = frozenset(k for k in _SUMMARY_KEYS if "bits_" not in k)


def dlion_version() -> str:
    try:
        return version("dlion")
    except PackageNotFoundError:
        return "unknown"


def _summary_row(summary: dict[str, Any]) -> torch.Tensor:
    values = [float(summary[k]) for k in _SUMMARY_KEYS]
    for direction in ("sent_bytes_by_kind", "received_bytes_by_kind"):
        values += [float(summary[direction][k]) for k in _KIND_KEYS]
    # float64 holds byte counts exactly up to 2**53 (9 PB).
    return torch.tensor(values, dtype=torch.float64)


def _summary_from_row(row: list[float]) -> dict[str, Any]:
    n = len(_SUMMARY_KEYS)
    out: dict[str, Any] = {
        k: int(v) if k in _INT_KEYS else v for k, v in zip(_SUMMARY_KEYS, row[:n], strict=True)
    }
    k = len(_KIND_KEYS)
    out["sent_bytes_by_kind"] = {key: int(v) for key, v in zip(_KIND_KEYS, row[n : n + k], strict=True)}
    out["received_bytes_by_kind"] = {
        key: int(v) for key, v in zip(_KIND_KEYS, row[n + k : n + 2 * k], strict=True)
    }
    return out


def gather_ledger_summaries(ctx: DistContext, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ledger summary, on every rank (one all_gather of a float64 row)."""
    rows = all_gather_rows(ctx, _summary_row(summary))
    return [_summary_from_row(r) for r in rows.tolist()]


def gather_mean_losses(ctx: DistContext, losses: list[float]) -> tuple[list[float], list[float]]:
    """Per-step train loss averaged over ranks, and each rank's mean over the run."""
    rows = all_gather_rows(ctx, torch.tensor(losses, dtype=torch.float64))
    return rows.mean(0).tolist(), rows.mean(1).tolist()


def gather_step_times(ctx: DistContext, step_time_s: list[float]) -> list[list[float]]:
    """Every rank's seconds per step (rank-major): the slowest rank's step is what a run waits
    for, and only every rank's own clock shows which one that was."""
    return all_gather_rows(ctx, torch.tensor(step_time_s, dtype=torch.float64)).tolist()


@dataclass
class RunRecord:
    """What the loop measured on this rank; turned into the report on rank 0."""

    config: dict[str, Any]
    corpus: dict[str, Any]
    n_params: int
    world_size: int
    backend: str | None
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[tuple[int, float]] = field(default_factory=list)
    val_accuracy: list[tuple[int, float]] = field(default_factory=list)  # classifiers only
    step_time_s: list[float] = field(default_factory=list)
    eval_time_s: float = 0.0
    setup_time_s: float = 0.0
    wall_time_s: float = 0.0
    resumed_from_step: int = 0  # the checkpoint this process started from; 0 for a fresh run
    rounds: int | None = None  # local-step optimizers: outer steps (the ranks' meetings)


def build_report(
    rec: RunRecord,
    *,
    mean_train_loss: list[float],
    rank_mean_loss: list[float],
    step_bytes: list[tuple[int, int]],
    ledgers: list[dict[str, Any]],
    identical: bool,
    param_sums: list[float],
    param_sha256: str,
    server_ledger: dict[str, Any] | None = None,
    resources: dict[str, Any] | None = None,
    step_time_by_rank: list[list[float]] | None = None,
) -> dict[str, Any]:
    steps = len(rec.step_time_s)
    train_time = sum(rec.step_time_s)
    return {
        "config": {
            **rec.config,
            "world_size": rec.world_size,
            "dist_backend": rec.backend,
            "torch_version": torch.__version__,
            "dlion_version": dlion_version(),
            "python_version": platform.python_version(),
            "platform": sys.platform,
        },
        "corpus": rec.corpus,
        "n_params": rec.n_params,
        "train_loss": mean_train_loss,
        "train_loss_mean_by_rank": rank_mean_loss,
        "val_loss": [[s, v] for s, v in rec.val_loss],
        "final_val_loss": rec.val_loss[-1][1] if rec.val_loss else math.nan,
        # Classification tasks (digits): fraction of validation examples right; else empty / None.
        "val_accuracy": [[s, a] for s, a in rec.val_accuracy],
        "final_val_accuracy": rec.val_accuracy[-1][1] if rec.val_accuracy else None,
        "step_bytes": [[s, r] for s, r in step_bytes],
        "ledger": ledgers[0],
        # Rank 0's bits per parameter beside fp32 ring all-reduce's at the same N.
        "saving": saving(ledgers[0], rec.world_size),
        # Local-step optimizers: the rounds the ranks met in (None: they met every step).
        "rounds": rec.rounds,
        "ledger_by_rank": ledgers,
        # A dedicated parameter server's own traffic (None when there is none).
        "server_ledger": server_ledger,
        # Per rank at each validation step: resident bytes, open descriptors, threads.
        "resources": resources,
        "params_identical_across_ranks": identical,
        "param_sum_by_rank": param_sums,
        # SHA-256 of rank 0's parameter bytes: equal reports trained to the same bits.
        "param_sha256": param_sha256,
        "resumed_from_step": rec.resumed_from_step,
        "wall_time_s": rec.wall_time_s,
        "setup_time_s": rec.setup_time_s,
        "train_time_s": train_time,
        "eval_time_s": rec.eval_time_s,
        "step_time_s_mean": train_time / steps if steps else math.nan,
        "step_time_s": rec.step_time_s,
        # Every rank's seconds per step (rank 0's is step_time_s).
        "step_time_s_by_rank": step_time_by_rank,
    }


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_FILE
    # Write then rename, so a reader never sees half a report.
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, allow_nan=True) + "\n")
    tmp.replace(path)
    return path
