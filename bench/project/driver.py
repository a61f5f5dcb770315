"""Cost-model projection: communication time per step from 8 to 1024 workers, by method.

The measured benchmark (``bench.comm``) runs a handful of ranks on one machine; this
projects the same steps to large clusters without running them. Each method's collectives
per step (``bench.project.model.plan``: the records its optimizer's ledger makes, whose bytes this
run checks against ``bench.comm.model``'s closed forms at every N it projects) are timed with an
alpha-beta model, ring or tree per collective, and compared with fp32 ring all-reduce and
with the compute time of one step.

    python -m bench.project --params 25e6 [--compute-ms 100] [--workers 8,16,...,1024]
        [--gbits 10,100,400] [--alpha-us 20,5,5] [--algorithm best] [--out bench-results/project]

Prints, per bandwidth, the projected communication ms per step of every method at every N
(and its speed-up over fp32 ring all-reduce), and with ``--compute-ms``, where each
method's communication crosses the compute time. Writes project.json, project.md and
project.png (communication vs N, log-log, one panel per bandwidth).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.comm.rank import tensor_numels
from bench.project.model import (
    ALGORITHMS,
    FP32_RING,
    METHODS,
    Algorithm,
    Method,
    Projection,
    check_bytes,
    find_crossover,
    last_fit,
    project,
)

DEFAULT_WORKERS, SMALL_WORKERS = "8,16,...,1024", "8,16,...,64"
DEFAULT_GBITS, SMALL_GBITS = "10,100,400", "10,100"
DEFAULT_OUT = Path("bench-results/project")
ALGORITHM_TEXT = {"best": "per collective, the faster of ring and tree", "ring": "rings", "tree": "trees"}


def default_alpha_us(gbits: float) -> float:
    """Per-message start-up: about 20 us over TCP on Ethernet below 100 Gbit/s, 5 us on RDMA
    fabrics (InfiniBand, RoCE) from 100 Gbit/s up."""
    return 20.0 if gbits < 100 else 5.0


def _numbers(flag: str, text: str, want: str, ok: Callable[[float], bool], one: bool = False) -> list[float]:
    """Comma-separated numbers; ValueError naming the flag, the bad item and what is expected."""
    items = str(text).split(",")
    if one and len(items) != 1:
        raise ValueError(f"{flag} takes one number, got {text!r}")
    values = []
    for item in items:
        try:
            v = float(item)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and ok(v)):
            raise ValueError(f"{flag}: {item.strip()!r} is not {want} (got {text!r})")
        values.append(v)
    return values


def _whole(low: int) -> Callable[[float], bool]:
    return lambda v: v.is_integer() and v >= low


def parse_workers(text: str) -> tuple[int, ...]:
    """'8,64,512', or 'A,B,...,Z': the geometric series A, B, B*(B/A), ... ending at Z."""
    want, items = "a whole number of workers >= 2", [s.strip() for s in str(text).split(",")]
    if "..." not in items:
        return tuple(sorted({int(v) for v in _numbers("--workers", text, want, _whole(2))}))
    if len(items) != 4 or items[2] != "...":
        raise ValueError(f"--workers: write a series as A,B,...,Z (e.g. 8,16,...,1024), got {text!r}")
    a, b, z = (int(v) for v in _numbers("--workers", ",".join(items[:2] + items[3:]), want, _whole(2)))
    if b <= a or b % a or z < b:
        raise ValueError(f"--workers: in A,B,...,Z, B must be a multiple of A and A < B <= Z, got {text!r}")
    series = [a]
    while series[-1] * (b // a) <= z:
        series.append(series[-1] * (b // a))
    if series[-1] != z:
        raise ValueError(f"--workers: {z} is not in the series {a}, {b}, ... (x{b // a}), got {text!r}")
    return tuple(series)


@dataclass(frozen=True, kw_only=True)
class ProjectConfig:
    """A checked projection request: the flags' values."""

    params: int
    workers: tuple[int, ...]
    gbits: tuple[float, ...]
    alpha_us: tuple[float, ...]  # one per bandwidth
    compute_ms: float | None = None
    algorithm: Algorithm = "best"
    out: Path = DEFAULT_OUT


def config_from_args(args: argparse.Namespace) -> ProjectConfig:
    """The flags, checked; ValueError names the bad value and what is expected."""
    params = _numbers(
        "--params", args.params, "a whole number of parameters >= 1, e.g. 25e6", _whole(1), True
    )
    small = getattr(args, "small", False)
    workers = args.workers or (SMALL_WORKERS if small else DEFAULT_WORKERS)
    text = args.gbits or (SMALL_GBITS if small else DEFAULT_GBITS)
    gbits = _numbers("--gbits", text, "a link bandwidth in Gbit/s > 0", lambda v: v > 0)
    if len(set(gbits)) != len(gbits):
        raise ValueError(f"--gbits: each bandwidth once, got {text!r} (compare latencies in separate runs)")
    alpha = [default_alpha_us(g) for g in gbits]
    if args.alpha_us is not None:
        alpha = _numbers("--alpha-us", args.alpha_us, "a latency in microseconds >= 0", lambda v: v >= 0)
        if len(alpha) not in (1, len(gbits)):
            raise ValueError(
                f"--alpha-us: give 1 value or {len(gbits)} (one per --gbits), got {args.alpha_us!r}"
            )
        alpha = alpha * len(gbits) if len(alpha) == 1 else alpha
    compute = None
    if args.compute_ms is not None:
        compute = _numbers(
            "--compute-ms", args.compute_ms, "a compute time per step in ms > 0", lambda v: v > 0, True
        )[0]
    return ProjectConfig(
        params=int(params[0]), workers=parse_workers(workers), gbits=tuple(gbits), alpha_us=tuple(alpha),
        compute_ms=compute, algorithm=args.algorithm, out=Path(args.out),
    )  # fmt: skip


FLAGS: tuple[tuple[str, str | None, str], ...] = (
    ("--params", "25e6", "model parameters d"),
    ("--compute-ms", None, "compute time of one step in ms: where does communication cross it?"),
    ("--workers", None, f"worker counts N: 8,64,512, or A,B,...,Z for a geometric series "
     f"(default {DEFAULT_WORKERS})"),
    ("--gbits", None, f"link bandwidths in Gbit/s (default {DEFAULT_GBITS})"),
    ("--alpha-us", None, "start-up per message in us: one, or one per --gbits "
     "(default 20 below 100 Gbit/s, else 5)"),
    ("--out", str(DEFAULT_OUT), "output folder"),
)  # fmt: skip


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    """The projection's flags, on any parser (``dlion bench project`` or this module's own)."""
    for flag, default, text in FLAGS:
        parser.add_argument(flag, default=default, help=text + (f" (default {default})" if default else ""))
    parser.add_argument(
        "--algorithm", default="best", choices=ALGORITHMS,
        help="all_gather/all_to_all algorithm of the compressed methods; best (default): per collective, "
        "the faster of ring and tree",
    )  # fmt: skip
    parser.add_argument(
        "--small", action="store_true", help=f"CI size: default N = {SMALL_WORKERS} at {SMALL_GBITS} Gbit/s"
    )


@dataclass(frozen=True)
class Crossing:
    """Where one method's communication crosses the compute time, at one bandwidth."""

    method: str
    gbits: float
    fits_up_to: int | None  # among the listed N: the largest with every N' <= N within compute
    first_over: int | None  # the listed N after it (None: fits at every listed N)
    last_fit: int | None  # by bisection between those two (None: nothing to bisect)
    ms: dict[int, float]  # communication ms at the N named above

    def text(self, compute_ms: float) -> str:
        fits, over, ms = self.fits_up_to, self.first_over, self.ms
        if over is None:
            assert fits is not None
            return f"always: {_ms(ms[fits])} ms at N = {fits} is within {compute_ms:g} ms"
        if fits is None:
            return f"never: N = {over} already needs {_ms(ms[over])} ms > {compute_ms:g} ms"
        return (
            f"fits up to N = {fits} ({_ms(ms[fits])} ms), N = {over} needs {_ms(ms[over])} ms; "
            f"crosses after N = {self.last_fit} ({_ms(ms[self.last_fit or fits])} ms)"
        )


def run(cfg: ProjectConfig) -> tuple[list[Projection], list[Crossing]]:
    """Every method at every N and bandwidth; where each crosses compute (with ``compute_ms``)."""
    numels = tensor_numels(cfg.params)
    check_bytes(numels, cfg.workers)  # the plans against bench.comm.model, before any time is computed
    rows, crossings = [], []
    for gbits, alpha_us in zip(cfg.gbits, cfg.alpha_us, strict=True):
        for m in METHODS:

            def at(n: int, m: Method = m, gbits: float = gbits, alpha: float = alpha_us * 1e-6) -> Projection:
                return project(m, n, cfg.params, gbits, alpha, algorithm=cfg.algorithm, numels=numels)

            points = [at(n) for n in cfg.workers]
            rows += points
            if cfg.compute_ms is None:
                continue
            fits, over = find_crossover([(p.n, p.comm_ms) for p in points], cfg.compute_ms)
            last = None
            if fits is not None and over is not None:
                last = last_fit(fits, over, lambda n: at(n).comm_ms, cfg.compute_ms)
            ms = {n: at(n).comm_ms for n in (fits, over, last) if n is not None}
            crossings.append(Crossing(m.label, gbits, fits, over, last, ms))
    return rows, crossings


def _ms(ms: float) -> str:
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _series(rows: list[Projection]) -> dict[tuple[str, float], list[Projection]]:
    """(method, gbits) -> its projections in ascending N."""
    out: dict[tuple[str, float], list[Projection]] = {}
    for p in rows:
        out.setdefault((p.method, p.gbits), []).append(p)
    return out


def _speedup(rows: list[Projection]) -> Callable[[Projection], float]:
    """fp32 ring all-reduce's communication time at the same N and bandwidth / the row's own."""
    base = {(p.n, p.gbits): p.comm_ms for p in rows if p.method == FP32_RING.label}
    return lambda p: base[p.n, p.gbits] / p.comm_ms


def render(cfg: ProjectConfig, rows: list[Projection], crossings: list[Crossing]) -> str:
    """Markdown: one table per bandwidth, then where communication crosses compute."""
    series, speedup = _series(rows), _speedup(rows)
    out = [
        f"# Projected communication per step: d = {cfg.params:,} parameters\n",
        "alpha-beta model, links full duplex. The fp32 rows run every collective as a ring, or every one "
        f"as a tree (recursive doubling); the other methods (--algorithm {cfg.algorithm}): "
        f"{ALGORITHM_TEXT[cfg.algorithm]}; gather and broadcast through a server: flat. "
        f"Cells: communication ms per step (speed-up over {FP32_RING.label}).",
    ]
    for gbits, alpha_us in zip(cfg.gbits, cfg.alpha_us, strict=True):
        out.append(f"\n## {gbits:g} Gbit/s, alpha {alpha_us:g} us\n")
        out.append(
            f"| method | {' | '.join(f'N={n}' for n in cfg.workers)} |\n|---|{'---:|' * len(cfg.workers)}"
        )
        for m in METHODS:
            cells = [f"{_ms(p.comm_ms)} ({speedup(p):.3g}x)" for p in series[m.label, gbits]]
            out.append(f"| {m.label} | " + " | ".join(cells) + " |")
    if cfg.compute_ms is not None:
        out.append(f"\n## Where communication crosses the compute time, {cfg.compute_ms:g} ms per step\n")
        out += [f"- {c.method} @ {c.gbits:g} Gbit/s: {c.text(cfg.compute_ms)}" for c in crossings]
    return "\n".join(out) + "\n"


def plot(cfg: ProjectConfig, rows: list[Projection], path: Path) -> bool:
    """Communication ms vs N, log-log, one panel per bandwidth; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(cfg.gbits), figsize=(5 * len(cfg.gbits), 5), sharey=True, squeeze=False)
    colors, series = plt.get_cmap("tab20").colors, _series(rows)  # type: ignore[attr-defined]
    for ax, gbits in zip(axes[0], cfg.gbits, strict=True):
        for i, m in enumerate(METHODS):
            pts = series[m.label, gbits]
            ls = "--" if m.vote == "average" and m.family == "dlion" else "-"
            ax.plot(
                [p.n for p in pts], [p.comm_ms for p in pts], ls, marker=".", color=colors[i], label=m.label
            )
        if cfg.compute_ms is not None:
            ax.axhline(cfg.compute_ms, color="black", lw=1.5, ls=":", label=f"compute {cfg.compute_ms:g} ms")
        ax.set(yscale="log", xlabel="workers N", title=f"{gbits:g} Gbit/s")
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("communication ms per step")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize=8)
    fig.suptitle(f"Projected communication per step, d = {cfg.params:,} (alpha-beta model)")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(
    cfg: ProjectConfig, rows: list[Projection], crossings: list[Crossing], table: str
) -> list[Path]:
    """project.json, project.md and project.png under ``cfg.out``; the paths written."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    speedup = _speedup(rows)
    report = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "numels": tensor_numels(cfg.params),
        "methods": [asdict(m) for m in METHODS],
        "rows": [asdict(p) | {"comm_ms": p.comm_ms, "speedup": speedup(p)} for p in rows],
        "crossings": [asdict(c) | {"text": c.text(cfg.compute_ms or 0.0)} for c in crossings],
    }
    paths = [cfg.out / "project.json", cfg.out / "project.md"]
    paths[0].write_text(json.dumps(report, indent=2))
    paths[1].write_text(table)
    if plot(cfg, rows, cfg.out / "project.png"):
        paths.append(cfg.out / "project.png")
    else:
        print("matplotlib is missing: no plot (pip install 'dlion[bench]')", file=sys.stderr)
    return paths


def run_project(args: argparse.Namespace) -> int:
    """The projection for flags from ``add_project_arguments``; ValueError on a bad flag."""
    cfg = config_from_args(args)
    rows, crossings = run(cfg)
    table = render(cfg, rows, crossings)
    paths = write_outputs(cfg, rows, crossings, table)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.project",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_project_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_project(args)
    except ValueError as err:
        parser.error(str(err))
