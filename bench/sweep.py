"""The tuning sweep behind the job's defaults: lr and betas per optimizer family.

    python -m bench.sweep [--task bytes] [--workers 4] [--steps 400] [--seed 0] [--out DIR]
        [--families lion,adamw,...] [--virtual]

Each cell is a `dlion train` run at the study's budget, its report in
``DIR/runs/<task>/<optimizer>-lr<lr>-b<b1>_<b2>-w<N>-s<seed>/`` (a cell whose report exists
is not run again: a stopped sweep continues). The cells that decide a choice run first: the
betas at the old default lr, then lr around the best betas. The summary ranks every cell of
a family by final validation loss and names the best; the job's defaults
(dlion.worker.catalogue) and the study's per-task table (bench.convergence) copy it by hand,
with the figures, so a change of default is always a measured one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common.jobs import Job, backend_flags, run_jobs, train_argv


@dataclass(frozen=True)
class Cell:
    optimizer: str
    lr: float
    betas: tuple[float, float]

    def name(self, workers: int, seed: int) -> str:
        return f"{self.optimizer}-lr{self.lr:g}-b{self.betas[0]:g}_{self.betas[1]:g}-w{workers}-s{seed}"


_LION = (0.8, 0.9)
_ADAMW = (0.9, 0.999)
# Per family and task, in the order they ran: the deciding cells first (betas at the old
# default lr, then lr around the best betas, each optimizer of the family on its own).
PLANS: dict[str, dict[str, tuple[Cell, ...]]] = {
    "bytes": {
        "lion": (
            *(Cell("dlion-mavo", 5e-4, b) for b in (_LION, (0.9, 0.99))),
            *(Cell("dlion-mavo", lr, _LION) for lr in (1e-3, 2e-3)),
            *(Cell("lion-global", lr, _LION) for lr in (5e-4, 1e-3)),
        ),
        "adamw": tuple(Cell("adamw-global", lr, _ADAMW) for lr in (4e-3, 2e-3)),
        "powersgd": (Cell("powersgd", 4e-3, _ADAMW),),
        "sto": (Cell("dlion-sto", 1e-3, _LION),),
    },
    "digits": {
        "lion": tuple(Cell(o, lr, _LION) for o in ("dlion-mavo", "lion-global") for lr in (1e-3, 2e-3, 4e-3)),
        "adamw": tuple(Cell("adamw-global", lr, _ADAMW) for lr in (5e-3, 1e-2, 2e-2)),
    },
}
TASK_FLAGS = {"bytes": ["--eval-every", "50"], "digits": ["--batch-size", "32", "--eval-every", "50"]}


def jobs(task: str, families: Sequence[str], *, workers: int, steps: int, seed: int, out: Path,
         virtual: bool) -> list[Job]:  # fmt: skip
    plan = PLANS[task]
    unknown = [f for f in families if f not in plan]
    if unknown:
        raise ValueError(
            f"no sweep for families {unknown} on task {task!r}; expected some of {', '.join(plan)}"
        )
    made = []
    for family in families:
        for cell in plan[family]:
            folder = out / "runs" / task / cell.name(workers, seed)
            flags = [
                "--task",
                task,
                "--optimizer",
                cell.optimizer,
                "--lr",
                f"{cell.lr:g}",
                "--steps",
                str(steps),
            ]
            flags += ["--beta1", f"{cell.betas[0]:g}", "--beta2", f"{cell.betas[1]:g}", "--seed", str(seed)]
            flags += [*TASK_FLAGS[task], *backend_flags(cell.optimizer)]
            if virtual and cell.optimizer != "powersgd":  # DDP needs processes
                argv = [sys.executable, "-m", "dlion", "train", "--virtual-workers", str(workers), *flags,
                        "--out", str(folder)]  # fmt: skip
            else:
                argv = train_argv(flags, workers=workers, out=folder)
            made.append(Job(f"{task} {cell.name(workers, seed)}", argv, folder))
    return made


def summary(reports: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per cell, best final validation loss first within each optimizer."""
    rows = []
    for path in reports:
        r = json.loads(path.read_text())
        c = r["config"]
        rows.append({
            "cell": path.parent.name, "optimizer": c["optimizer"], "lr": c["lr"],
            "betas": [c["beta1"], c["beta2"]], "workers": c["world_size"], "steps": c["steps"],
            "final_val_loss": r["final_val_loss"], "final_val_accuracy": r.get("final_val_accuracy"),
        })  # fmt: skip
    return sorted(rows, key=lambda row: (row["optimizer"], row["final_val_loss"]))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="bytes", choices=tuple(PLANS))
    p.add_argument("--families", default=None, help="comma-separated (default: every family of the task)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--virtual", action="store_true", help="virtual workers (all but powersgd)")
    p.add_argument("--out", type=Path, default=Path("bench-results/sweep"))
    args = p.parse_args(argv)
    families = args.families.split(",") if args.families else list(PLANS[args.task])
    try:
        todo = jobs(args.task, families, workers=args.workers, steps=args.steps, seed=args.seed,
                    out=args.out, virtual=args.virtual)  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    rows = summary(run_jobs(todo))
    (args.out / f"{args.task}-summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    best: set[str] = set()
    for row in rows:
        mark = "" if row["optimizer"] in best else "  <- best"
        best.add(row["optimizer"])
        acc = row["final_val_accuracy"]
        print(
            f"{row['cell']:<45} val loss {row['final_val_loss']:.4f}"
            + (f" acc {acc:.3f}" if acc else "")
            + mark
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
