"""The PNG plots of ``dlion report``: validation loss against step, bytes and time, and bits
per parameter. matplotlib is imported only inside plots(), so a missing matplotlib costs the
plots, not the table.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlion.ledger import saving
from dlion.report.runs import Group
from dlion.report.table import SPREAD, loss_unit


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
    unit = loss_unit([{"task": g.first.task} for g in groups])
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
    written.append(_save(plt, bits_figure(plt, groups), out / "bits_per_param.png"))
    return written


def bits_figure(plt: Any, groups: Sequence[Group]) -> Any:
    """Bits per parameter per step, up and down, one pair of bars per configuration, and what
    a ring all-reduce of fp32 gradients would send at the same N, with the ratio (log scale)."""
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(groups) + 2), 5))
    bits = {
        d: [statistics.fmean(float(r.ledger[f"bits_per_param_{d}"]) for r in g.runs) for g in groups]
        for d in ("up", "down")
    }
    shown = [v for values in bits.values() for v in values if v > 0]
    labelled = False
    for i, g in enumerate(groups):
        s = saving({f"bits_per_param_{d}": bits[d][i] for d in bits}, g.first.world_size)
        ref = s["fp32_allreduce_bits_per_param"]
        if ref > 0:
            label = None if labelled else "fp32 all-reduce, same N"
            ax.hlines(ref, i - 0.45, i + 0.45, color="k", linewidth=2, label=label)
            labelled, fewer = True, s["fewer_than_fp32"]
            text = f"{ref:.0f}" + (f" ({fewer:.1f}x fewer)" if fewer is not None else "")
            ax.annotate(text, (i, ref), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
            shown.append(ref)
    for k, (direction, offset) in enumerate((("up", -0.2), ("down", 0.2))):
        values = bits[direction]
        bars = ax.bar([i + offset for i in range(len(groups))], values, 0.4, color=f"C{k}", label=direction)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), [g.label for g in groups], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("bits per parameter per step (rank 0 ledger)")
    # Powers of two, from well below the smallest bar (so bars show their height) to well
    # above the reference (room for the legend).
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    if shown:
        ax.set_ylim(min(shown) / 4, max(shown) * 6)
    ax.set_title(
        "Bits per parameter per step, up (sent) and down (received)\nbeside fp32 ring all-reduce", fontsize=10
    )
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
