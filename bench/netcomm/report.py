"""Rows of the emulated-cluster benchmark from its ranks' files; tables and the plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.netcomm.model import BASELINE, HEADLINE, case_by_label, expected
from launch.netns import parse_rate


@dataclass(frozen=True, kw_only=True)
class Row:
    """One case at one model size and rate; bytes in the worker's view (rank 1 when rank 0 serves)."""

    rate: str
    size: int
    case: str
    ms: float  # median over the timed steps of the slowest rank's step time
    ms_steps: tuple[float, ...]  # the slowest rank's time of each timed step
    sent: int  # the worker's ledger, bytes per steady-state step
    received: int
    model_sent: int
    model_received: int
    ledger_ok: bool  # every rank's every step after the first equals its cost model
    iface_tx: float | None  # the worker's host: eth0 bytes per timed step (frames, headers included)
    iface_rx: float | None
    tcp_resent: int | None  # segments TCP sent again on the worker's host, over the timed steps
    iface_by_host: tuple[tuple[float, float], ...] | None  # every host's (tx, rx) per timed step
    speedup: float  # adamw-global's ms / this row's, same size and rate
    bytes_ratio: float  # adamw-global's (sent + received) / this row's
    server_sent: int | None = None  # rank 0's ledger when it serves
    server_received: int | None = None


def launch_rows(rate: str, ranks: Sequence[dict[str, Any]]) -> list[Row]:
    """Rows of one launch (one rate, every size); ``ranks[r]`` is rank r's file."""
    n = len(ranks)
    rows: list[Row] = []
    for size_key, first in ranks[0]["sizes"].items():
        shapes = [tuple(s) for s in first["shapes"]]
        partial = []
        for label in first["cases"]:
            case = case_by_label(label)
            res = [r["sizes"][size_key]["cases"][label] for r in ranks]
            ok = all(
                tuple(sb) == (m.sent, m.received)
                for rank, rr in enumerate(res)
                for m in [expected(case, shapes, n, rank=rank)]
                for sb in rr["step_bytes"][1:]
            )
            w = case.worker_rank
            slowest = [max(step) * 1e3 for step in zip(*(rr["times_s"] for rr in res), strict=True)]
            model = expected(case, shapes, n, rank=w)
            k = len(slowest)
            iface = res[w]["iface"]
            by_host = [rr["iface"] for rr in res]
            srv = res[0]["step_bytes"][-1] if case.server_rank == 0 else (None, None)
            partial.append(
                dict(
                    rate=rate, size=int(size_key), case=label, ms=statistics.median(slowest),
                    ms_steps=tuple(slowest), sent=res[w]["step_bytes"][-1][0],
                    received=res[w]["step_bytes"][-1][1], model_sent=model.sent,
                    model_received=model.received, ledger_ok=ok,
                    iface_tx=iface["tx_bytes"] / k if iface else None,
                    iface_rx=iface["rx_bytes"] / k if iface else None,
                    tcp_resent=iface["tcp_retrans_segs"] if iface else None,
                    iface_by_host=tuple((h["tx_bytes"] / k, h["rx_bytes"] / k) for h in by_host)
                    if all(by_host) else None,
                    server_sent=srv[0], server_received=srv[1],
                )
            )  # fmt: skip
        base = next((p for p in partial if p["case"] == BASELINE.label), None)
        for p in partial:
            speed = base["ms"] / p["ms"] if base else float("nan")
            ratio = (base["sent"] + base["received"]) / (p["sent"] + p["received"]) if base else float("nan")
            rows.append(Row(**p, speedup=speed, bytes_ratio=ratio))
    return rows


def host_totals(counters: list[Any], ranks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each host's interface bytes over the whole launch beside its rank's ledger, every step summed
    (warm-up steps included). The interface also carries torchrun's rendezvous, Gloo's set-up,
    the barriers, and 66 bytes of headers per frame."""
    out = []
    for host, (c, rank) in enumerate(zip(counters, ranks, strict=True)):
        steps = [
            sb
            for size in rank["sizes"].values()
            for res in size["cases"].values()
            for sb in res["step_bytes"]
        ]
        sent, received = sum(s for s, _ in steps), sum(r for _, r in steps)
        out.append(
            {
                "host": host, "iface_tx_bytes": c.tx_bytes, "iface_rx_bytes": c.rx_bytes,
                "tcp_retransmitted_segments": c.tcp_retrans_segs,
                "ledger_sent": sent, "ledger_received": received,
                "tx_over_sent": c.tx_bytes / sent if sent else None,
                "rx_over_received": c.rx_bytes / received if received else None,
                "peak_rss_mib": rank["peak_rss_mib"],
            }
        )  # fmt: skip
    return out


def _size(n: int) -> str:
    for unit, div in (("M", 10**6), ("k", 10**3)):
        if n >= div:
            return f"{n / div:g}{unit}"
    return str(n)


def _columns(rows: Sequence[Row]) -> list[tuple[str, int]]:
    return sorted({(r.rate, r.size) for r in rows}, key=lambda rs: (_rate_key(rs[0]), rs[1]))


def _rate_key(rate: str) -> float:
    return float(parse_rate(rate))


def _cases(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.case for r in rows))


def time_table(rows: Sequence[Row]) -> str:
    """ms per step, and the speed-up over adamw-global, per case and (rate, size)."""
    cols = _columns(rows)
    at = {(r.case, r.rate, r.size): r for r in rows}
    lines = [
        "| case | " + " | ".join(f"{_size(s)} @ {rate}" for rate, s in cols) + " |",
        "|---|" + "--:|" * len(cols),
    ]
    for case in _cases(rows):
        cells = [at.get((case, rate, s)) for rate, s in cols]
        lines.append(
            f"| {case} | "
            + " | ".join("-" if r is None else f"{r.ms:,.1f} ms ({r.speedup:.1f}x)" for r in cells)
            + " |"
        )
    return "\n".join(lines)


def bytes_table(rows: Sequence[Row]) -> str:
    """Ledger bytes per worker per step, sent / received, per case and size (the same at any rate)."""
    sizes = sorted({r.size for r in rows})
    at: dict[tuple[str, int], Row] = {}
    for r in rows:
        at.setdefault((r.case, r.size), r)
    ok = {(r.case, r.size): ok for r in rows for ok in [r.ledger_ok and at[(r.case, r.size)].ledger_ok]}
    lines = [
        "| case | "
        + " | ".join(f"{_size(s)}: sent / recv B (adamw ÷)" for s in sizes)
        + " | ledger = model |",
        "|---|" + "--:|" * len(sizes) + ":-:|",
    ]
    for case in _cases(rows):
        cells = [at.get((case, s)) for s in sizes]
        good = all(ok.get((case, s), True) for s in sizes)
        lines.append(
            f"| {case} | "
            + " | ".join(
                "-" if r is None else f"{r.sent:,} / {r.received:,} ({r.bytes_ratio:.1f}x)" for r in cells
            )
            + f" | {'yes' if good else 'NO'} |"
        )
    return "\n".join(lines)


def detail_table(rows: Sequence[Row]) -> str:
    """Every row: the worker host's interface bytes per step beside its ledger's."""
    lines = [
        "| rate | size | case | ms/step | ledger sent / recv B | iface tx / rx B | iface ÷ ledger tx / rx "
        "| TCP resent | server sent / recv B |",
        "|---|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        iface = "-" if r.iface_tx is None else f"{r.iface_tx:,.0f} / {r.iface_rx:,.0f}"
        ratio = (
            "-" if r.iface_tx is None else f"{r.iface_tx / r.sent:.3f} / {(r.iface_rx or 0) / r.received:.3f}"
        )
        server = "-" if r.server_sent is None else f"{r.server_sent:,} / {r.server_received:,}"
        if r.server_sent is not None and r.iface_by_host is not None:
            tx, rx = r.iface_by_host[0]
            server += f" (iface {tx:,.0f} / {rx:,.0f})"
        lines.append(
            f"| {r.rate} | {r.size:,} | {r.case} | {r.ms:,.1f} | {r.sent:,} / {r.received:,} | {iface} "
            f"| {ratio} | {r.tcp_resent if r.tcp_resent is not None else '-'} | {server} |"
        )
    return "\n".join(lines)


def headlines(rows: Sequence[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.case == HEADLINE.label:
            base = next(b for b in rows if (b.case, b.rate, b.size) == (BASELINE.label, r.rate, r.size))
            out.append(
                f"- {_size(r.size)} parameters at {r.rate}: {HEADLINE.label} step {r.ms:,.1f} ms vs "
                f"{BASELINE.label} {base.ms:,.1f} ms: {r.speedup:.1f}x faster, "
                f"{r.bytes_ratio:.1f}x fewer bytes"
            )
    bad = [f"{r.rate} {r.size:,} {r.case}" for r in rows if not r.ledger_ok]
    out.append("- ledger == cost model, to the byte, every rank and step: " + ("yes" if not bad else "NO"))
    out.extend(f"  - MISMATCH: {b}" for b in bad)
    return out


def plot(rows: Sequence[Row], path: Path) -> bool:
    """Time and bytes per step against model size, log-log; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(15, 6))
    rates = sorted({r.rate for r in rows}, key=_rate_key)
    styles = ("-", "--", ":", "-.")
    cmap = plt.get_cmap("tab20")
    for i, case in enumerate(_cases(rows)):
        color, marker = cmap(i % 20), "osD^vPX*<>ph"[i % 12]
        for j, rate in enumerate(rates):
            pts = sorted((r.size, r.ms) for r in rows if (r.case, r.rate) == (case, rate))
            ax_t.plot(*zip(*pts, strict=True), styles[j % 4], color=color, marker=marker)
        pts = sorted({(r.size, r.sent + r.received) for r in rows if r.case == case})
        ax_b.plot(*zip(*pts, strict=True), "-", color=color, marker=marker, label=case)
    for ax, ylabel in (
        (ax_t, "ms per optimizer step (median of the slowest rank)"),
        (ax_b, "bytes sent + received per worker per step (ledger)"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    names = ("solid", "dashed", "dotted", "dash-dot")
    ax_t.set_title("time per step; " + ", ".join(f"{r}: {names[j % 4]}" for j, r in enumerate(rates)))
    ax_b.set_title("bytes per worker per step")
    ax_b.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
