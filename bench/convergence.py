"""Convergence on real tasks: every optimizer, several worker counts and seeds, one table.

    python -m bench.convergence [--small] [--tasks bytes,digits] [--workers 4,8,16,32]
        [--seeds 0,1,2] [--optimizers ...] [--steps N] [--virtual-from 8] [--rate 1gbit] [--out DIR]

Each run is a real ``dlion train`` job (or, with ``--rate``, ``python -m launch.cluster`` on emulated
hosts, one worker per host, so wall time includes a shaped network). From ``--virtual-from``
workers on, a run is one process of virtual workers (``--virtual-workers N``: the same
parameters as N processes, bit for bit, at the cost of N workers' compute on one machine),
except powersgd, which needs DDP's processes; each report says which it was. It writes to
``DIR/runs/<task>/<optimizer>-w<N>-s<seed>/``. A run whose report already exists is not
run again, so a long full run can be stopped and continued. The summary (bench.
runs: table and plots per task) and the D-Lion paper's figure, final validation loss
against bits per parameter per iteration, go to DIR; they cover every run under DIR, so
plans run one after another into one DIR are summed up together.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common.flags import check_ints, check_names, ints, names
from bench.common.jobs import Job, backend_flags, run_jobs, train_argv
from bench.common.plots import bits_axis, panels, save
from dlion import report
from dlion.train.config import TASKS
from dlion.worker import catalogue

# The distributed optimizers: `lion` is the single-process reference, not a baseline here.
DEFAULT_OPTIMIZERS = catalogue.names(single_process=False)
# How each task trains: steps, batch, evaluation, and per-optimizer learning rates where
# the job's defaults (tuned on the byte-level model) do not fit.
TASK_FLAGS: dict[str, list[str]] = {
    "bytes": ["--eval-every", "50"],
    "digits": ["--batch-size", "32", "--eval-every", "50"],
}
# digits: swept at 4 workers, 400 steps, seed 0, by final validation loss (python -m bench.sweep
# --task digits): dlion-mavo over 1e-3, 2e-3, 4e-3 at betas (0.8, 0.9): 4e-3 (0.016); the Lion
# family takes it. adamw-global over 5e-3, 1e-2, 2e-2: 2e-2 (0.014); powersgd takes it.
# terngrad and dgc: an earlier sweep (0.02..0.2) at the old betas. The language model's
# values are the job's defaults.
_DIGITS_LION_LR = 4e-3
TASK_LR: dict[str, dict[str, float]] = {
    "bytes": {},
    "digits": {
        **dict.fromkeys(
            ("dlion-mavo", "dlion-avg", "dlion-sto", "signum-mavo", "lion-global"), _DIGITS_LION_LR
        ),
        "adamw-global": 2e-2,
        "powersgd": 2e-2,
        "terngrad": 0.1,
        "dgc": 0.1,
    },
}
# --small: minutes on a laptop, for newcomers and CI.
SMALL_OPTIMIZERS = ("dlion-mavo", "adamw-global", "terngrad")
SMALL_WORKERS, SMALL_SEEDS, SMALL_STEPS = (2,), (0,), 20
FULL_WORKERS, FULL_SEEDS, FULL_STEPS = (4, 8, 16, 32), (0, 1, 2), 400
VIRTUAL_FROM = 8


@dataclass(frozen=True, kw_only=True)
class Plan:
    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    workers: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    rate: str | None
    out: Path
    virtual_from: int = VIRTUAL_FROM

    def __post_init__(self) -> None:
        check_names("tasks", self.tasks, TASKS)
        check_names("optimizers", self.optimizers, catalogue.OPTIMIZER_NAMES)
        check_ints("workers", self.workers, low=1)
        check_ints("seeds", self.seeds, low=0)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        check_ints("virtual_from", (self.virtual_from,), low=1)

    def virtual(self, optimizer: str, workers: int) -> bool:
        """Whether a run is virtual workers: from ``virtual_from`` on, never on emulated hosts
        (their point is the network) and never for a DDP row."""
        return self.rate is None and workers >= self.virtual_from and not catalogue.entry(optimizer).ddp

    def runs(self) -> list[tuple[str, str, int, int]]:
        return [
            (t, o, w, s)
            for t in self.tasks
            for o in self.optimizers
            for w in self.workers
            for s in self.seeds
        ]

    def run_dir(self, task: str, optimizer: str, workers: int, seed: int) -> Path:
        return self.out / "runs" / task / f"{optimizer}-w{workers}-s{seed}"


def command(plan: Plan, task: str, optimizer: str, workers: int, seed: int) -> list[str]:
    """The `dlion train` (or `python -m launch.cluster`) command of one run."""
    flags = ["--task", task, "--optimizer", optimizer, "--seed", str(seed), "--steps", str(plan.steps)]
    flags += [*TASK_FLAGS[task], *backend_flags(optimizer)]
    lr = TASK_LR[task].get(optimizer)
    if lr is not None:
        flags += ["--lr", str(lr)]
    out = plan.run_dir(task, optimizer, workers, seed)
    if plan.virtual(optimizer, workers):
        return [
            sys.executable,
            "-m",
            "dlion",
            "train",
            "--virtual-workers",
            str(workers),
            *flags,
            "--out",
            str(out),
        ]
    return train_argv(flags, workers=workers, out=out, rate=plan.rate)


def run_all(plan: Plan) -> list[Path]:
    """Run every missing run of the plan; the report paths, in plan order."""
    jobs = [
        Job(f"{task} {optimizer} w{workers} s{seed}", command(plan, task, optimizer, workers, seed),
            plan.run_dir(task, optimizer, workers, seed))
        for task, optimizer, workers, seed in plan.runs()
    ]  # fmt: skip
    return run_jobs(jobs)


def paper_points(reports: list[Path]) -> list[dict[str, Any]]:
    """Per (task, optimizer, workers): bits per parameter per iteration, up + down, and the
    seed-mean final validation loss (and accuracy for digits): the D-Lion paper's axes."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for path in reports:
        r = json.loads(path.read_text())
        key = (r["config"]["task"], r["config"]["optimizer"], int(r["config"]["world_size"]))
        groups.setdefault(key, []).append(r)
    points = []
    for (task, optimizer, workers), rs in sorted(groups.items()):
        losses = [r["final_val_loss"] for r in rs]
        accs = [r["final_val_accuracy"] for r in rs if r.get("final_val_accuracy") is not None]
        ledger = rs[0]["ledger"]
        points.append(
            {
                "task": task,
                "optimizer": optimizer,
                "workers": workers,
                "seeds": len(rs),
                "virtual": any(r["config"].get("virtual_workers") for r in rs),
                "bits_per_param_up": ledger["bits_per_param_up"],
                "bits_per_param_down": ledger["bits_per_param_down"],
                "final_val_loss_mean": sum(losses) / len(losses),
                "final_val_loss_min": min(losses),
                "final_val_loss_max": max(losses),
                "final_val_accuracy_mean": sum(accs) / len(accs) if accs else None,
                "wall_time_s_mean": sum(r["wall_time_s"] for r in rs) / len(rs),
            }
        )
    return points


def paper_figure(points: list[dict[str, Any]], path: Path) -> Path:
    """Final validation loss against bits per parameter per iteration (up + down), log x,
    one panel per task and a marker per optimizer: the D-Lion paper's trade-off figure."""
    tasks = sorted({p["task"] for p in points})
    fig, axes, colors = panels(len(tasks), sorted({p["optimizer"] for p in points}), (6, 4.5))
    for ax, task in zip(axes, tasks, strict=True):
        for p in (p for p in points if p["task"] == task):
            bits = p["bits_per_param_up"] + p["bits_per_param_down"]
            low, high = p["final_val_loss_min"], p["final_val_loss_max"]
            mean = p["final_val_loss_mean"]
            ax.errorbar(
                bits,
                mean,
                yerr=[[mean - low], [high - mean]],
                fmt="o",
                capsize=3,
                color=colors[p["optimizer"]],
            )
            ax.annotate(f"{p['optimizer']} w{p['workers']}", (bits, mean), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")  # fmt: skip
        bits_axis(
            ax,
            xlabel="bits per parameter per iteration (up + down, per worker)",
            ylabel="final validation loss (seed mean, min-max bars)",
            title=f"{task}: loss vs communication",
        )
    return save(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.convergence",
        description="Every optimizer on the byte-level LM and the digits CNN: final validation loss "
        "(and accuracy), bits per parameter per step, wall time.",
    )
    p.add_argument("--small", action="store_true", help="a few minutes: 2 workers, 1 seed, 3 optimizers")
    p.add_argument("--tasks", type=names, default=TASKS, help=f"default: {','.join(TASKS)}")
    p.add_argument("--optimizers", type=names, default=None, help="default: every distributed optimizer")
    p.add_argument("--workers", type=ints, default=None, help="default: 4,8,16,32 (2 with --small)")
    p.add_argument("--seeds", type=ints, default=None, help="default: 0,1,2 (0 with --small)")
    p.add_argument("--steps", type=int, default=None, help="default: 400 (20 with --small)")
    p.add_argument(
        "--virtual-from",
        type=int,
        default=VIRTUAL_FROM,
        help="runs of this many workers or more are virtual workers (default: %(default)s)",
    )
    p.add_argument("--rate", default=None, help="run on emulated hosts with links of this rate (e.g. 1gbit)")
    p.add_argument("--out", type=Path, default=Path("bench-results/convergence"), help="default: %(default)s")
    return p


def plan_from_args(args: argparse.Namespace) -> Plan:
    small = args.small
    return Plan(
        tasks=tuple(args.tasks),
        optimizers=tuple(args.optimizers or (SMALL_OPTIMIZERS if small else DEFAULT_OPTIMIZERS)),
        workers=tuple(args.workers or (SMALL_WORKERS if small else FULL_WORKERS)),
        seeds=tuple(args.seeds or (SMALL_SEEDS if small else FULL_SEEDS)),
        steps=args.steps or (SMALL_STEPS if small else FULL_STEPS),
        rate=args.rate,
        out=args.out,
        virtual_from=args.virtual_from,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    run_all(plan)
    # Every run under OUT, not only this plan's: plans run one after another into one OUT
    # (say 3 seeds at 4 workers, then 1 at 8) are summed up together.
    reports = sorted((plan.out / "runs").glob("*/*/report.json"))
    points = paper_points(reports)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "points.json").write_text(json.dumps(points, indent=1) + "\n")
    paper_figure(points, plan.out / "loss_vs_bits.png")
    for task in sorted({p["task"] for p in points}):  # per task: dlion report's table and curves
        code = report.main([str(plan.out / "runs" / task), "--out", str(plan.out / task)])
        if code != 0:
            return code
    for pt in points:
        acc = pt["final_val_accuracy_mean"]
        print(
            f"{pt['task']:>7} {pt['optimizer']:>13} w{pt['workers']}{'v' if pt['virtual'] else ''} "
            f"seeds {pt['seeds']}: "
            f"val loss {pt['final_val_loss_mean']:.4f} [{pt['final_val_loss_min']:.4f}, "
            f"{pt['final_val_loss_max']:.4f}]"
            + (f" acc {acc:.3f}" if acc is not None else "")
            + f" | {pt['bits_per_param_up']:.3f} bits/param up | {pt['wall_time_s_mean']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
