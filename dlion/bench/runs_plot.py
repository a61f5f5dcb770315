"""How ``dlion report`` shows grouped runs: a row of numbers each, the Markdown table, the PNG plots.

dlion.bench.runs knows the report's schema (reading, checking, grouping); this module knows
how the groups are presented. matplotlib is imported only inside plots(), so a missing
matplotlib costs the plots, not the table.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlion.bench.runs import Group

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
    ("seeds", lambda r: ", ".join(map(str, r["seeds"]))),
    ("steps", lambda r: str(r["steps"])),
    ("final val loss", lambda r: _f(r["final_val_loss"]["mean"], ".4f")),
    ("min-max", _loss_range),
    ("val accuracy", lambda r: _f(r["final_val_accuracy"], ".4f")),
    ("bits/param/step up", lambda r: _f(r["bits_per_param_up"], ".4f")),
    ("down", lambda r: _f(r["bits_per_param_down"], ".4f")),
    ("MB sent/worker", lambda r: _mb(r["mb_sent_per_worker"])),
    ("s/step", lambda r: _f(r["step_time_s_mean"], ".3f")),
    ("wall s", lambda r: _f(r["wall_time_s"], ".1f")),
    ("iface MB sent/host", _net("interface_tx_mb_per_host", ".2f")),
    ("iface/ledger", _net("interface_over_ledger_sent", ".3f")),
]


def _unit(rows: Sequence[Row]) -> str:
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
        f"\nfinal val loss: {_unit(rows)}, mean over a row's runs (its seeds); min-max: the lowest and "
        "highest of them. Bits and MB: rank 0's ledger (payload, padding and metadata). s/step: mean "
        "step time on rank 0; wall s: the worker's whole run. Both times: mean over the runs."
    )
    if net:
        note += (
            " iface: the emulated cluster's Ethernet bytes sent, per host, and their ratio to the ledger's."
        )
    return "\n".join([*lines, note])


@dataclass(frozen=True)
class Curve:
    """A group's validation loss at the steps every one of its runs evaluated, over its seeds."""

    label: str
    seeds: int  # runs pooled; two runs of one seed count twice
    steps: list[int]
    loss_mean: list[float]
    loss_min: list[float]
    loss_max: list[float]
    bytes_sent: list[float]  # rank 0's bytes sent up to each step, mean over seeds
    train_s: list[float]  # the sum of step times up to each step, mean over seeds


def curve(group: Group) -> Curve:
    points = [{p[0]: p for p in r.val_points()} for r in group.runs]
    steps = sorted(set.intersection(*(set(p) for p in points)))
    at = [[p[s] for p in points] for s in steps]
    mean = statistics.fmean
    return Curve(
        label=group.label,
        seeds=len(group.runs),
        steps=steps,
        loss_mean=[mean(q[1] for q in qs) for qs in at],
        loss_min=[min(q[1] for q in qs) for qs in at],
        loss_max=[max(q[1] for q in qs) for qs in at],
        bytes_sent=[mean(q[2] for q in qs) for qs in at],
        train_s=[mean(q[3] for q in qs) for qs in at],
    )


def plots(groups: Sequence[Group], out: Path) -> list[Path]:
    """Validation loss against step, bytes sent and training time, and bits per parameter
    per step; the PNGs written, none when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    curves = [curve(g) for g in groups]
    unit = _unit([{"task": g.first.task} for g in groups])
    shading = f"line: mean over seeds; shaded: {SPREAD}"
    axes = [
        ("val_loss_vs_step.png", "steps", "optimizer step", "Validation loss vs step"),
        ("val_loss_vs_bytes.png", "bytes_sent", "bytes sent by rank 0 (cumulative, log scale)",
         "Validation loss vs bytes sent per worker"),
        ("val_loss_vs_time.png", "train_s", "training time, s (sum of step times; no setup, no validation)",
         "Validation loss vs training time"),
    ]  # fmt: skip
    written = []
    for name, field, xlabel, title in axes:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        silent = []
        for i, c in enumerate(curves):
            xs: list[float] = [float(x) for x in getattr(c, field)]
            keep = [j for j, x in enumerate(xs) if x > 0 or field != "bytes_sent"]  # log axis: no 0 bytes
            if not keep:
                silent.append(c.label)
                continue
            x = [xs[j] for j in keep]
            label = c.label + (f" ({c.seeds} runs)" if c.seeds > 1 else "")
            ax.plot(x, [c.loss_mean[j] for j in keep], "o-", color=f"C{i}", markersize=3, label=label)
            if c.seeds > 1:
                lo, hi = [c.loss_min[j] for j in keep], [c.loss_max[j] for j in keep]
                ax.fill_between(x, lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
        if field == "bytes_sent":
            ax.set_xscale("log")
            if silent:
                ax.text(0.01, 0.01, "not shown, 0 bytes sent: " + ", ".join(silent),
                        transform=ax.transAxes, fontsize=8)  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"validation loss ({unit})")
        ax.set_title(f"{title}\n({shading})", fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        written.append(_save(plt, fig, out / name))
    written.append(_bits_chart(plt, groups, out / "bits_per_param.png"))
    return written


def _bits_chart(plt: Any, groups: Sequence[Group], path: Path) -> Path:
    """Bits per parameter per step, up and down, one pair of bars per configuration."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(groups) + 2), 5))
    labels = [g.label for g in groups]
    for k, (direction, offset) in enumerate((("up", -0.2), ("down", 0.2))):
        values = [
            statistics.fmean(float(r.ledger[f"bits_per_param_{direction}"]) for r in g.runs) for g in groups
        ]
        bars = ax.bar([i + offset for i in range(len(groups))], values, 0.4, color=f"C{k}", label=direction)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("bits per parameter per step (rank 0 ledger)")
    ax.set_title(
        "Communication per optimizer step: bits per parameter, up (sent) and down (received)", fontsize=11
    )
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
