"""Local steps against a vote every step (issue 26): the language model, one table.

    python -m bench.local_study [--small] [--rows NAMES] [--workers 4,8] [--seeds 0]
        [--local-grid 0.25,0.5,1] [--diloco-grid 0.5,0.7,1] [--rank-steps 8000] [--steps N]
        [--virtual-from 8] [--out DIR] [--dry-run] [--summary-only]

Every run streams the standard library's text (``--sampling stream``) for rank-steps / workers
steps, so all read the same 16.4 M bytes (2,000 steps at 4 workers, 1,000 at 8), under one
epoch: no byte twice. Rows: adamw-global, lion-global, dlion-mavo, powersgd rank 1 and 4, diloco H = 16
and 64, dlion-local H = 4, 16, 64 with and without error feedback; a local row once per outer
lr of its grid (dlion-local's as fractions of H: its sign step is outer-lr inner lrs, so H is
as far as H inner steps go). Cells run deciding ones first (adamw-global, dlion-mavo,
dlion-local H = 16, diloco H = 16, then the rest) into DIR/runs/w<N>/<row>[-lr<X>]-s<seed>/,
skipping any with a report (stop and continue at will); from --virtual-from workers on as
virtual workers, except powersgd (DDP needs processes). DIR/study.md, study.json and
loss_vs_bits.png sum up the plan's cells with a report; dlion report's curves go to DIR/w<N>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common.flags import check_ints, check_names, ints, names
from bench.common.jobs import Job, backend_flags, run_jobs, train_argv
from bench.common.plots import bits_axis, panels, save
from dlion import report
from dlion.ledger import fp32_ring_bits_per_param
from dlion.worker import catalogue


@dataclass(frozen=True, kw_only=True)
class Row:
    """One method of the table; ``grid`` says how its outer lr is read: "local" (fractions of
    H), "diloco" (as given), None (no outer step)."""

    name: str
    optimizer: str
    tier: int  # run order: the cells that decide the target come first
    local_steps: int | None = None
    error_feedback: bool = False
    grid: str | None = None
    flags: tuple[str, ...] = ()


def _local(h: int, ef: bool, tier: int = 4) -> Row:
    name = f"dlion-local-h{h}" + ("-ef" if ef else "")
    return Row(name=name, optimizer="dlion-local", tier=tier, local_steps=h, error_feedback=ef, grid="local")


def _diloco(h: int, tier: int = 4) -> Row:
    return Row(name=f"diloco-h{h}", optimizer="diloco", tier=tier, local_steps=h, grid="diloco")


# In table order. Tiers 0-3 decide the target: is dlion-local at H = 16 as good as AdamW's
# all-reduce and the vote every step, and as good as DiLoCo at the same H?
ROWS: tuple[Row, ...] = (
    Row(name="adamw-global", optimizer="adamw-global", tier=0),
    Row(name="lion-global", optimizer="lion-global", tier=4),
    Row(name="dlion-mavo", optimizer="dlion-mavo", tier=1),
    Row(name="powersgd-r1", optimizer="powersgd", tier=4, flags=("--powersgd-rank", "1")),
    Row(name="powersgd-r4", optimizer="powersgd", tier=4, flags=("--powersgd-rank", "4")),
    _diloco(16, tier=3),
    _diloco(64),
    _local(4, False),
    _local(4, True),
    _local(16, False, tier=2),
    _local(16, True),
    _local(64, False),
    _local(64, True),
)
ROW_NAMES = tuple(r.name for r in ROWS)
_BY_NAME = {r.name: r for r in ROWS}

# The whole standard library (about 31.5 MB of *.py here, 30.3 MB after the validation split):
# a cap above it takes every file.
STUDY_DATA_BYTES = 64_000_000
# 32 validation batches (65 kB) instead of the job's 8: the rows differ by a few hundredths.
STUDY_FLAGS = ("--task", "bytes", "--sampling", "stream", "--data-bytes", str(STUDY_DATA_BYTES),
               "--eval-every", "100", "--eval-batches", "32")  # fmt: skip
SMALL_FLAGS = ("--task", "bytes", "--sampling", "stream", "--data-bytes", "200000", "--d-model", "32",
               "--layers", "1", "--heads", "2", "--context", "32", "--batch-size", "4",
               "--eval-every", "2", "--eval-batches", "2")  # fmt: skip
FULL_WORKERS, FULL_LOCAL_GRID, FULL_DILOCO_GRID = (4, 8), (0.25, 0.5, 1.0), (0.5, 0.7, 1.0)
SMALL_WORKERS, SMALL_LOCAL_GRID, SMALL_DILOCO_GRID = (2, 3), (0.5,), (0.7,)
RANK_STEPS, SMALL_STEPS, VIRTUAL_FROM, SMALL_VIRTUAL_FROM = 8000, 4, 8, 3
TRAIN_TAIL = 50  # final train loss: the mean of the last steps' (each the mean over ranks)
JOB_TIMEOUT_S = 4 * 3600.0


@dataclass(frozen=True)
class Cell:
    """One run: a row at a worker count, outer lr (None: the row has none) and seed."""

    row: Row
    workers: int
    outer_lr: float | None
    seed: int
    steps: int

    @property
    def name(self) -> str:
        lr = "" if self.outer_lr is None else f"-lr{self.outer_lr:g}"
        return f"{self.row.name}{lr}-s{self.seed}"


@dataclass(frozen=True, kw_only=True)
class Plan:
    rows: tuple[str, ...]
    workers: tuple[int, ...]
    seeds: tuple[int, ...]
    local_grid: tuple[float, ...]  # dlion-local's outer lr, as fractions of H
    diloco_grid: tuple[float, ...]  # DiLoCo's outer (Nesterov SGD) lr
    rank_steps: int = RANK_STEPS  # steps x workers: every run reads the same bytes
    steps: int | None = None  # the same steps at every worker count instead
    virtual_from: int = VIRTUAL_FROM
    flags: tuple[str, ...] = STUDY_FLAGS  # the model and data flags every run shares
    out: Path = Path("bench-results/local-study")

    def __post_init__(self) -> None:
        check_names("rows", self.rows, ROW_NAMES)
        check_ints("workers", self.workers, low=1)
        check_ints("seeds", self.seeds, low=0)
        check_ints("virtual_from", (self.virtual_from,), low=1)
        for name in ("local_grid", "diloco_grid"):
            grid = getattr(self, name)
            if not grid or any(not x > 0 for x in grid):
                raise ValueError(f"{name} must be a non-empty list of numbers > 0, got {list(grid)}")
        low = max(self.workers)
        if self.steps is None and self.rank_steps < low:
            raise ValueError(f"rank_steps={self.rank_steps} gives no step at {low} workers")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    def steps_at(self, workers: int) -> int:
        return self.steps if self.steps is not None else self.rank_steps // workers

    def outer_lrs(self, row: Row) -> list[float | None]:
        if row.grid == "local":
            assert row.local_steps is not None  # a local row has its H
            return [f * row.local_steps for f in self.local_grid]
        return list(self.diloco_grid) if row.grid == "diloco" else [None]

    def cells(self) -> list[Cell]:
        """Every run, the cells that decide the target first."""
        rows = [_BY_NAME[n] for n in self.rows]
        cells = [
            Cell(row, w, lr, s, self.steps_at(w))
            for row in rows
            for w in self.workers
            for lr in self.outer_lrs(row)
            for s in self.seeds
        ]
        return sorted(cells, key=lambda c: (c.row.tier, c.workers, ROW_NAMES.index(c.row.name)))

    def run_dir(self, cell: Cell) -> Path:
        return self.out / "runs" / f"w{cell.workers}" / cell.name

    def virtual(self, cell: Cell) -> bool:
        known = cell.row.optimizer in catalogue.OPTIMIZER_NAMES
        return cell.workers >= self.virtual_from and not (known and catalogue.entry(cell.row.optimizer).ddp)


def cell_flags(plan: Plan, cell: Cell) -> list[str]:
    """The training flags of one cell (no launcher, no --out)."""
    row = cell.row
    flags = [*plan.flags, "--optimizer", row.optimizer, "--seed", str(cell.seed), "--steps", str(cell.steps)]
    flags += [*backend_flags(row.optimizer), *row.flags]
    if row.local_steps is not None:
        flags += ["--local-steps", str(row.local_steps)]
    if cell.outer_lr is not None:
        flags += ["--outer-lr", f"{cell.outer_lr:g}"]
    if row.error_feedback:
        flags += ["--error-feedback"]
    return flags


def command(plan: Plan, cell: Cell) -> list[str]:
    """The `dlion train` command of one cell."""
    flags, out = cell_flags(plan, cell), plan.run_dir(cell)
    if plan.virtual(cell):
        virtual = ["--virtual-workers", str(cell.workers)]
        return [sys.executable, "-m", "dlion", "train", *virtual, *flags, "--out", str(out)]
    return train_argv(flags, workers=cell.workers, out=out)


def run_all(plan: Plan) -> list[Path]:
    """Run every cell without a report, in plan order; refuse rows this build cannot train."""
    cells = plan.cells()
    missing = sorted({c.row.optimizer for c in cells} - set(catalogue.OPTIMIZER_NAMES))
    if missing:
        raise ValueError(
            f"optimizer(s) {', '.join(missing)} are not in this build's catalogue; leave their rows "
            f"out with --rows (have: {', '.join(catalogue.OPTIMIZER_NAMES)})"
        )
    jobs = [Job(f"{c.name} w{c.workers}", command(plan, c), plan.run_dir(c)) for c in cells]
    return run_jobs(jobs, timeout_s=JOB_TIMEOUT_S)


def final_train_loss(report_: dict[str, Any]) -> float:
    """The mean of the last TRAIN_TAIL steps' training loss (each the mean over ranks)."""
    tail = report_["train_loss"][-TRAIN_TAIL:]
    return float(statistics.fmean(tail))


def summarize(plan: Plan) -> list[dict[str, Any]]:
    """A table row per (row, workers, outer lr) with a report, its seeds pooled."""
    groups: dict[tuple[str, int, float | None], list[tuple[Cell, dict[str, Any]]]] = {}
    for cell in plan.cells():
        path = plan.run_dir(cell) / "report.json"
        if path.is_file():
            key = (cell.row.name, cell.workers, cell.outer_lr)
            groups.setdefault(key, []).append((cell, json.loads(path.read_text())))
    return [_point(runs) for runs in groups.values()]


def _point(runs: list[tuple[Cell, dict[str, Any]]]) -> dict[str, Any]:
    """One table row: the means over the runs (seeds) of one cell; bits from rank 0's ledger."""
    cell, reports, mean = runs[0][0], [r for _, r in runs], statistics.fmean
    val = [float(r["final_val_loss"]) for r in reports]
    train = mean(final_train_loss(r) for r in reports)
    fewer = [r["saving"]["fewer_than_fp32"] for r in reports]
    epochs = [r["corpus"].get("epochs") for r in reports]  # a random sampler's run has none
    return {
        "row": cell.row.name,
        "optimizer": cell.row.optimizer,
        "workers": cell.workers,
        "virtual": any(r["config"].get("virtual_workers") for r in reports),
        "local_steps": cell.row.local_steps,
        "outer_lr": cell.outer_lr,
        "seeds": [c.seed for c, _ in runs],
        "steps": cell.steps,
        "final_val_loss": mean(val),
        "final_val_loss_min": min(val),
        "final_val_loss_max": max(val),
        "final_train_loss": train,
        "gap": mean(val) - train,
        "epochs": None if None in epochs else mean(epochs),
        "bits_per_param_up": mean(float(r["ledger"]["bits_per_param_up"]) for r in reports),
        "bits_per_param_down": mean(float(r["ledger"]["bits_per_param_down"]) for r in reports),
        "fp32_allreduce_bits_per_param": fp32_ring_bits_per_param(cell.workers),
        "fewer_than_fp32": None if None in fewer else mean(fewer),
        "wall_min": mean(float(r["wall_time_s"]) for r in reports) / 60,
    }


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


# (header, cell) of the study's table.
COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("row", lambda r: r["row"]),
    ("workers", lambda r: f"{r['workers']}{'v' if r['virtual'] else ''}"),
    ("H", lambda r: _f(r["local_steps"], "d")),
    ("outer lr", lambda r: _f(r["outer_lr"], "g")),
    ("seeds", lambda r: ",".join(map(str, r["seeds"]))),
    ("final val loss", lambda r: f"{r['final_val_loss']:.4f}"),
    ("min-max", lambda r: f"{r['final_val_loss_min']:.4f} to {r['final_val_loss_max']:.4f}"),
    ("final train loss", lambda r: f"{r['final_train_loss']:.4f}"),
    ("gap", lambda r: f"{r['gap']:+.4f}"),
    ("epochs", lambda r: _f(r["epochs"], ".3f")),
    ("bits/param/step up", lambda r: f"{r['bits_per_param_up']:.4f}"),
    ("down", lambda r: f"{r['bits_per_param_down']:.4f}"),
    ("fp32 all-reduce", lambda r: f"{r['fp32_allreduce_bits_per_param']:.1f}"),
    ("x fewer", lambda r: _f(r["fewer_than_fp32"], ".1f")),
    ("wall min", lambda r: f"{r['wall_min']:.1f}"),
]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as Markdown, then what each number is."""
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|---|" + "--:|" * (len(COLUMNS) - 1)]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in rows]
    note = (
        "\nLosses in nats per byte, means over a row's seeds (min-max: their range). final train loss: "
        f"the mean of the last {TRAIN_TAIL} steps' training loss, each the mean over ranks, on windows "
        "not trained on before (a streamed epoch); for the local-step rows that is the ranks' own models "
        "between outer steps. gap: final val loss - final train loss. epochs: the share of the training "
        "text the run walked (while at most 1, no byte was a target twice). Bits: rank 0's ledger per "
        "parameter per step, averaged over every step (a local row sends at its outer steps only; "
        "powersgd's fp32 warm-up counts); fp32 all-reduce: a ring all-reduce of fp32 gradients each step "
        "at the same N; x fewer: that over the heavier direction. workers: 8v is 8 virtual workers "
        "(threads of one process)."
    )
    return "\n".join([*lines, note])


def figure(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Final validation loss against bits per parameter per step (up + down), log x, a panel
    per worker count, a colour per row family."""
    counts = sorted({r["workers"] for r in rows})
    fig, axes, colors = panels(len(counts), sorted({r["optimizer"] for r in rows}), (7, 5))
    for ax, workers in zip(axes, counts, strict=True):
        for r in (r for r in rows if r["workers"] == workers):
            bits, v = r["bits_per_param_up"] + r["bits_per_param_down"], r["final_val_loss"]
            err = [[v - r["final_val_loss_min"]], [r["final_val_loss_max"] - v]]
            ax.errorbar(bits, v, yerr=err, fmt="o", capsize=3, color=colors[r["optimizer"]])
            label = r["row"] + ("" if r["outer_lr"] is None else f" lr{r['outer_lr']:g}")
            ax.annotate(label, (bits, v), fontsize=6, xytext=(4, 2), textcoords="offset points")
        bits_axis(
            ax,
            xlabel="bits per parameter per step (up + down, rank 0)",
            ylabel="final validation loss, nats per byte",
            title=f"{workers} workers: loss vs communication",
        )
    return save(fig, path)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.local_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="CI-sized: a tiny model, 2 and 3 workers, 4 steps")
    p.add_argument("--rows", type=names, default=ROW_NAMES, help=f"default: {','.join(ROW_NAMES)}")
    p.add_argument("--workers", type=ints, default=None, help="default: 4,8 (2,3 with --small)")
    p.add_argument("--seeds", type=ints, default=None, help="default: 0")
    p.add_argument("--local-grid", type=_floats, default=None, help="dlion-local's outer lr as fractions "
                   "of H (default: 0.25,0.5,1; 0.5 with --small)")  # fmt: skip
    p.add_argument("--diloco-grid", type=_floats, default=None, help="DiLoCo's outer lr (default: 0.5,0.7,1)")
    p.add_argument("--rank-steps", type=int, default=RANK_STEPS, help="steps x workers (default: 8000)")
    p.add_argument("--steps", type=int, default=None, help="the same steps at every worker count")
    p.add_argument("--virtual-from", type=int, default=None, help="virtual from this many (default: 8)")
    p.add_argument("--out", type=Path, default=Path("bench-results/local-study"), help="default: %(default)s")
    p.add_argument("--dry-run", action="store_true", help="print the cells' commands in run order; run none")
    p.add_argument("--summary-only", action="store_true", help="run nothing; sum up the reports there are")
    return p


def plan_from_args(args: argparse.Namespace) -> Plan:
    small = args.small
    return Plan(
        rows=tuple(args.rows),
        workers=tuple(args.workers or (SMALL_WORKERS if small else FULL_WORKERS)),
        seeds=tuple(args.seeds or (0,)),
        local_grid=tuple(args.local_grid or (SMALL_LOCAL_GRID if small else FULL_LOCAL_GRID)),
        diloco_grid=tuple(args.diloco_grid or (SMALL_DILOCO_GRID if small else FULL_DILOCO_GRID)),
        rank_steps=args.rank_steps,
        steps=args.steps or (SMALL_STEPS if args.small else None),
        virtual_from=args.virtual_from or (SMALL_VIRTUAL_FROM if args.small else VIRTUAL_FROM),
        flags=SMALL_FLAGS if args.small else STUDY_FLAGS,
        out=args.out,
    )


def write_summary(plan: Plan) -> list[dict[str, Any]]:
    """study.md, study.json, loss_vs_bits.png and dlion report's curves per worker count."""
    rows = summarize(plan)
    if not rows:
        print(f"no reports under {plan.out / 'runs'} yet")
        return rows
    text = table(rows)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "study.json").write_text(json.dumps(rows, indent=1) + "\n")
    (plan.out / "study.md").write_text(f"# Local steps\n\n{text}\n\n![](loss_vs_bits.png)\n")
    figure(rows, plan.out / "loss_vs_bits.png")
    for workers in sorted({r["workers"] for r in rows}):
        runs = plan.out / "runs" / f"w{workers}"
        if report.main([str(runs), "--out", str(plan.out / f"w{workers}")]) != 0:
            raise RuntimeError(f"dlion report failed on {runs}")
    print(text)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from_args(args)
        if args.dry_run:
            for i, cell in enumerate(plan.cells(), 1):
                print(f"[{i}] {' '.join(command(plan, cell))}")
            return 0
        if not args.summary_only:
            run_all(plan)
    except ValueError as e:
        parser.error(str(e))
    write_summary(plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
