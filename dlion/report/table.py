"""How ``dlion report`` tabulates grouped runs: a row of numbers each, and the Markdown table."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from dlion.ledger import saving
from dlion.report.runs import Group

SPREAD = "min-max over seeds"
Row = dict[str, Any]


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}


def summarize(group: Group) -> dict[str, Any]:
    """A table row: the group's means over runs (bits and bytes are equal across seeds)."""
    runs = group.runs
    mean = statistics.fmean
    row: dict[str, Any] = {
        "label": group.label,
        "task": group.first.task,
        "optimizer": group.first.optimizer,
        "backend": group.first.backend,
        "workers": group.first.world_size,
        "settings": {k: json.loads(v) for k, v in group.first.settings},
        "differs": dict(group.extras),
        "seeds": [r.seed for r in runs],
        "runs": [str(r.path) for r in runs],
        "steps": max(len(r.step_time_s) for r in runs),
        "final_val_loss": spread([r.final_val_loss for r in runs]),
        "bits_per_param_up": mean(float(r.ledger["bits_per_param_up"]) for r in runs),
        "bits_per_param_down": mean(float(r.ledger["bits_per_param_down"]) for r in runs),
        "mb_sent_per_worker": mean(float(r.ledger["bytes_sent"]) for r in runs) / 1e6,
        "step_time_s_mean": mean(mean(r.step_time_s) if r.step_time_s else math.nan for r in runs),
        "wall_time_s": mean(r.wall_time_s for r in runs),
        "final_val_accuracy": None,
        "network": None,
    }
    row.update(saving(row, group.first.world_size))  # beside fp32 ring all-reduce at the same N
    accuracy = [r.final_val_accuracy for r in runs if r.final_val_accuracy is not None]
    if accuracy:
        row["final_val_accuracy"] = mean(accuracy)
    nets = [r.network for r in runs if r.network is not None]
    if nets:
        totals = [n.get("totals", {}) for n in nets]
        tx = [float(t.get("interface_tx_bytes", math.nan)) / max(int(n.get("hosts", 1)), 1)
              for t, n in zip(totals, nets, strict=True)]  # fmt: skip
        ratio = [float(t.get("tx_over_ledger_sent") or math.nan) for t in totals]
        row["network"] = {
            "interface_tx_mb_per_host": mean(tx) / 1e6,
            "interface_over_ledger_sent": mean(ratio),
        }
    return row


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None or math.isnan(x) else format(x, fmt)


def _mb(x: float) -> str:
    return _f(x, ".2f" if x >= 0.1 else ".2g")  # a tiny test run's bytes stay visible


def _loss_range(r: Row) -> str:
    v = r["final_val_loss"]
    return f"{v['min']:.4f} to {v['max']:.4f}" if len(r["seeds"]) > 1 else "-"


def _net(key: str, fmt: str) -> Callable[[Row], str]:
    return lambda r: _f((r["network"] or {}).get(key), fmt)


# (header, cell). markdown_table leaves out the columns that would say nothing: settings when
# no groups need telling apart, task when every run trained bytes, val accuracy without a
# classifier, the interface columns without a run on the emulated cluster.
_COLUMNS: list[tuple[str, Callable[[Row], str]]] = [
    ("task", lambda r: r["task"]),
    ("optimizer", lambda r: r["optimizer"]),
    ("backend", lambda r: r["backend"]),
    ("workers", lambda r: str(r["workers"])),
    ("settings", lambda r: " ".join(f"{k}={v}" for k, v in r["differs"].items()) or "-"),
    ("runs (seeds)", lambda r: f"{len(r['seeds'])} ({', '.join(map(str, r['seeds']))})"),
    ("steps", lambda r: str(r["steps"])),
    ("final val loss", lambda r: _f(r["final_val_loss"]["mean"], ".4f")),
    ("min-max", _loss_range),
    ("val accuracy", lambda r: _f(r["final_val_accuracy"], ".4f")),
    ("bits/param/step up", lambda r: _f(r["bits_per_param_up"], ".4f")),
    ("down", lambda r: _f(r["bits_per_param_down"], ".4f")),
    ("fp32 all-reduce", lambda r: _f(r["fp32_allreduce_bits_per_param"] or None, ".1f")),
    ("x fewer", lambda r: _f(r["fewer_than_fp32"], ".1f")),
    ("MB sent/worker", lambda r: _mb(r["mb_sent_per_worker"])),
    ("s/step", lambda r: _f(r["step_time_s_mean"], ".3f")),
    ("wall s", lambda r: _f(r["wall_time_s"], ".1f")),
    ("iface MB sent/host", _net("interface_tx_mb_per_host", ".2f")),
    ("iface/ledger", _net("interface_over_ledger_sent", ".3f")),
]


def loss_unit(rows: Sequence[Row]) -> str:
    """The language model's loss is per byte; a classifier's (digits) is per example."""
    return "nats per byte" if all(r["task"] == "bytes" for r in rows) else "cross-entropy, nats"


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows of ``runs.summarize`` as a Markdown table, then a note saying what each number is."""
    net = any(r["network"] for r in rows)
    skip = {"settings"} if not any(r["differs"] for r in rows) else set()
    skip |= set() if net else {"iface MB sent/host", "iface/ledger"}
    skip |= set() if any(r["task"] != "bytes" for r in rows) else {"task"}
    skip |= set() if any(r["final_val_accuracy"] is not None for r in rows) else {"val accuracy"}
    cols = [(h, cell) for h, cell in _COLUMNS if h not in skip]
    lines = [
        "| " + " | ".join(h for h, _ in cols) + " |",
        "|"
        + "|".join("---" if h in ("task", "optimizer", "backend", "settings") else "--:" for h, _ in cols)
        + "|",
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in cols) + " |" for r in rows]
    note = (
        f"\nfinal val loss: {loss_unit(rows)}, mean over a row's runs (its seeds); min-max: the lowest and "
        "highest of them. Bits and MB: rank 0's ledger (payload, padding and metadata). fp32 all-reduce: "
        "what a ring all-reduce of fp32 gradients sends per parameter each way at the same N; x fewer: "
        "that over the heavier of up and down. s/step: mean step time on rank 0; wall s: the worker's "
        "whole run. Both times: mean over the runs."
    )
    if net:
        note += (
            " iface: the emulated cluster's Ethernet bytes sent, per host, and their ratio to the ledger's."
        )
    return "\n".join([*lines, note])
