"""Rows of the communication benchmark from the ranks' files: table, headline, plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.comm.model import FP32, HEADLINE, VARIANTS, Bytes, by_label, expected_bytes


@dataclass(frozen=True)
class Row:
    """One variant at one N over one transport, in the worker's view (rank 1 for a server)."""

    transport: str
    n: int
    variant: str
    sent: int
    received: int
    model_sent: int
    model_received: int
    ledger_ok: bool  # every rank's steady-state ledger equals its cost model, every timed step
    ms: float  # median over timed steps of the slowest rank's step time
    bytes_ratio: float  # fp32 all-reduce bytes (sent + received) / this row's
    time_ratio: float  # fp32 all-reduce step time / this row's
    server_sent: int | None = None
    server_received: int | None = None


def launch_rows(
    transport: str,
    n: int,
    bucket_numel: int,
    ranks: Sequence[dict[str, Any]],
    base: tuple[Bytes, float] | None = None,
) -> list[Row]:
    """Rows of one launch; ``ranks[r]`` is rank r's result file. ``base`` is fp32 all-reduce's
    (bytes, ms) at this N when the launch itself has no fp32 row (a dedicated server's)."""
    numels = ranks[0]["numels"]
    partial = []
    for label in ranks[0]["variants"]:
        variant = by_label(label)
        per_rank = [r["variants"][label] for r in ranks]
        steady = [Bytes(*res["step_bytes"][-1]) for res in per_rank]
        ok = all(
            all(
                Bytes(*sb) == expected_bytes(variant, numels, n, bucket_numel, rank=rank)
                for sb in res["step_bytes"][1:]
            )
            for rank, res in enumerate(per_rank)
        )
        worker = variant.worker_rank(n)
        model = expected_bytes(variant, numels, n, bucket_numel, rank=worker)
        slowest = [max(step) for step in zip(*(res["times_s"] for res in per_rank), strict=True)]
        server = steady[variant.server_rank(n)] if variant.has_server else None
        partial.append((label, steady[worker], model, ok, 1e3 * statistics.median(slowest), server))
    if base is None:
        fp32 = next(p for p in partial if p[0] == FP32.label)
        base = (fp32[1], fp32[4])
    return [
        Row(
            transport,
            n,
            label,
            got.sent,
            got.received,
            model.sent,
            model.received,
            ok,
            ms,
            base[0].total / got.total,
            base[1] / ms,
            server.sent if server else None,
            server.received if server else None,
        )
        for label, got, model, ok, ms, server in partial
    ]


def _b(x: int) -> str:
    return f"{x:,}"


def render(rows: Sequence[Row]) -> str:
    """A Markdown table of every row, then the server lines and the headline."""
    head = (
        "| transport | N | optimizer | sent B/step | recv B/step | model sent / recv | ledger = model "
        "| fp32 ÷ bytes | ms/step | fp32 ÷ ms |"
    )
    lines = [head, "|---|--:|---|--:|--:|--:|:-:|--:|--:|--:|"]
    for r in rows:
        lines.append(
            f"| {r.transport} | {r.n} | {r.variant} | {_b(r.sent)} | {_b(r.received)} "
            f"| {_b(r.model_sent)} / {_b(r.model_received)} | {'yes' if r.ledger_ok else 'NO'} "
            f"| {r.bytes_ratio:.2f}x | {r.ms:.1f} | {r.time_ratio:.2f}x |"
        )
    lines.append("")
    lines.append(
        "Bytes: one worker's ledger in a steady-state step (rank 1 where rank 0 is the server; "
        "a server process is an extra rank, N + 1 processes). "
        "fp32 ÷ bytes: fp32 all-reduce's (sent + received) over the row's; fp32 ÷ ms: its step time "
        "over the row's (> 1: faster than fp32). ms/step: median of timed steps, slowest rank."
    )
    for r in rows:
        if r.server_sent is not None:
            lines.append(
                f"- the server ({'its own process' if 'process' in r.variant else 'rank 0'}), "
                f"{r.transport} N={r.n} {r.variant}: sent {_b(r.server_sent)}, "
                f"received {_b(r.server_received or 0)} B/step"
            )
    lines.extend(headline(rows))
    return "\n".join(lines)


def headline(rows: Sequence[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.variant == HEADLINE and r.n == 8:
            fp32 = next(f for f in rows if (f.transport, f.n, f.variant) == (r.transport, 8, FP32.label))
            out.append(
                f"- {r.transport} N=8: {HEADLINE} sends {fp32.sent / r.sent:.2f}x fewer bytes per worker "
                f"than fp32 ring all-reduce ({_b(r.sent)} vs {_b(fp32.sent)} B per step, ledger)"
            )
    bad = [f"{r.transport} N={r.n} {r.variant}" for r in rows if not r.ledger_ok]
    out.append(
        "- ledger == docs/design.md cost model, to the byte, in every row: " + ("yes" if not bad else "NO")
    )
    out.extend(f"  - MISMATCH: {b}" for b in bad)
    return out


def plot(rows: Sequence[Row], numels: list[int], bucket_numel: int, path: Path) -> bool:
    """Bytes per worker per step vs N (log scale), measured and modelled; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = sorted({r.n for r in rows})
    fig, ax = plt.subplots(figsize=(10, 5.5))
    shown = [v for v in VARIANTS if any(r.variant == v.label for r in rows)]
    for i, variant in enumerate(shown):
        seen = {r.n: r.sent + r.received for r in rows if r.variant == variant.label}
        xs = sorted(seen)
        # Shrinking markers keep variants with equal bytes (allgather's two votes) both visible.
        style: dict[str, Any] = {"color": f"C{i}", "marker": "osD^vPX*"[i % 8], "markersize": max(4, 11 - i)}
        ax.plot(xs, [seen[n] for n in xs], linestyle="none", label=variant.label, **style)
        model = [
            expected_bytes(variant, numels, n, bucket_numel, rank=variant.worker_rank(n)).total for n in sizes
        ]
        ax.plot(sizes, model, "--", color=f"C{i}", alpha=0.6)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("N (ranks)")
    ax.set_ylabel("bytes sent + received per worker per step")
    ax.set_title(f"Distributed Lion vs fp32 all-reduce, {sum(numels):,} parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="points: ledger; dashed: cost model", fontsize=8, title_fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
