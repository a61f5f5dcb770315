"""What majority vote survives: final validation loss with K of N workers attacking.

    python -m bench.byzantine [--small] [--workers N] [--optimizers ...]
        [--attacks flip,random,zero] [--seeds 0] [--steps S] [--task bytes] [--out DIR]

For K = 0, 1, ... up to just under N/2, every optimizer trains with the last K ranks
sending corrupted updates (``dlion train --byzantine K --attack A``; dlion.worker.core.byzantine):
inverted, random or constant signs for the voters, negated, random or zero gradients for
adamw-global. Runs land in DIR/runs/ and are skipped when their report exists. Writes
DIR/byzantine.json, DIR/byzantine.md (a table: one row per optimizer and attack, one column
per K) and DIR/byzantine.png (validation loss against K).
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
from dlion.train.config import TASKS
from dlion.worker import catalogue
from dlion.worker.core.byzantine import ATTACKS

DEFAULT_OPTIMIZERS = ("dlion-mavo", "dlion-avg", "adamw-global")
# 5 workers: odd, so the vote has no ties, and up to 2 attackers stay under N/2.
FULL_WORKERS, FULL_STEPS, SMALL_WORKERS, SMALL_STEPS = 5, 400, 3, 10
SMALL_OPTIMIZERS, SMALL_ATTACKS = ("dlion-mavo", "adamw-global"), ("flip",)
TASK_FLAGS: dict[str, list[str]] = {"bytes": ["--eval-every", "50"], "digits": ["--batch-size", "32"]}


@dataclass(frozen=True, kw_only=True)
class Plan:
    task: str
    workers: int
    optimizers: tuple[str, ...]
    attacks: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    out: Path

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.workers < 2:
            raise ValueError(f"workers must be >= 2 (one attacker and an honest rank), got {self.workers}")
        check_names("optimizers", self.optimizers, catalogue.names(byzantine=True))
        check_names("attacks", self.attacks, ATTACKS)
        check_ints("seeds", self.seeds, low=0)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def attackers(self) -> tuple[int, ...]:
        """0 up to just under half the workers."""
        return tuple(range((self.workers + 1) // 2))

    def runs(self) -> list[tuple[str, str, int, int]]:
        """(optimizer, attack, K, seed); K = 0 is one honest run, not one per attack."""
        return [
            (o, run_attack(a, k), k, s)
            for o in self.optimizers
            for k in self.attackers
            for a in (self.attacks if k else self.attacks[:1])
            for s in self.seeds
        ]

    def job(self, optimizer: str, attack: str, k: int, seed: int) -> Job:
        out = self.out / "runs" / f"{optimizer}-{attack}-k{k}-s{seed}"
        flags = ["--task", self.task, "--optimizer", optimizer, "--steps", str(self.steps)]
        flags += ["--seed", str(seed), *TASK_FLAGS[self.task], *backend_flags(optimizer)]
        if k:
            flags += ["--byzantine", str(k), "--attack", attack]
        label = f"{optimizer} {attack} K={k}/{self.workers} s{seed}"
        return Job(label, train_argv(flags, workers=self.workers, out=out), out)


def run_attack(attack: str, k: int) -> str:
    """The attack a run is filed under: "none" for the honest run (K = 0) every attack shares."""
    return "none" if k == 0 else attack


def _mean_loss(rows: list[dict[str, Any]]) -> dict[tuple[str, str, int], float]:
    return {(r["optimizer"], r["attack"], r["byzantine"]): r["final_val_loss_mean"] for r in rows}


def collect(plan: Plan, reports: list[Path]) -> list[dict[str, Any]]:
    """One row per (optimizer, attack, K): the seed-mean final validation loss and its range."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for (optimizer, attack, k, _), path in zip(plan.runs(), reports, strict=True):
        loss = json.loads(path.read_text())["final_val_loss"]
        groups.setdefault((optimizer, attack, k), []).append(loss)
    return [
        {"optimizer": o, "attack": a, "byzantine": k, "workers": plan.workers,
         "final_val_loss_mean": sum(v) / len(v), "final_val_loss_min": min(v), "final_val_loss_max": max(v)}
        for (o, a, k), v in groups.items()
    ]  # fmt: skip


def markdown(plan: Plan, rows: list[dict[str, Any]]) -> str:
    """Rows: optimizer and attack; columns: K attackers (K = 0, the honest run, in each row)."""
    loss = _mean_loss(rows)
    head = " | ".join(f"K = {k}" for k in plan.attackers)
    lines = [
        f"Final validation loss, {plan.task}, N = {plan.workers} workers, {plan.steps} steps, "
        f"seeds {','.join(map(str, plan.seeds))} (mean)",
        "",
        f"| optimizer | attack | {head} |",
        "|---|---|" + "--:|" * len(plan.attackers),
    ]
    for o in plan.optimizers:
        for a in plan.attacks:
            cells = [loss.get((o, run_attack(a, k), k)) for k in plan.attackers]
            text = ["-" if c is None else f"{c:.4f}" for c in cells]
            lines.append(f"| {o} | {a} | {' | '.join(text)} |")
    return "\n".join(lines) + "\n"


def figure(plan: Plan, rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = _mean_loss(rows)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = dict(zip(ATTACKS, ("-", "--", ":"), strict=True))
    for i, o in enumerate(plan.optimizers):
        for a in plan.attacks:
            ks = list(plan.attackers)
            ys = [loss[(o, run_attack(a, k), k)] for k in ks]
            ax.plot(ks, ys, styles[a], marker="o", color=plt.get_cmap("tab10")(i), label=f"{o}, {a}")
    ax.set_xticks(list(plan.attackers))
    ax.set_xlabel(f"byzantine workers K (of N = {plan.workers})")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"{plan.task}: validation loss with K attackers")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.byzantine", description=__doc__.split("\n\n")[0])
    small = f"{SMALL_WORKERS} workers, {SMALL_STEPS} steps, {','.join(SMALL_OPTIMIZERS)}, flip only"
    p.add_argument("--small", action="store_true", help=small)
    p.add_argument("--task", choices=TASKS, default="bytes", help="default: %(default)s")
    p.add_argument("--workers", type=int, default=None, help=f"N (default: {FULL_WORKERS})")
    p.add_argument("--optimizers", type=names, default=None, help=f"default: {','.join(DEFAULT_OPTIMIZERS)}")
    p.add_argument("--attacks", type=names, default=None, help=f"default: {','.join(ATTACKS)}")
    p.add_argument("--seeds", type=ints, default=(0,), help="default: 0")
    p.add_argument("--steps", type=int, default=None, help=f"default: {FULL_STEPS}")
    p.add_argument("--out", type=Path, default=Path("bench-results/byzantine"), help="default: %(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    small = args.small
    try:
        plan = Plan(
            task=args.task,
            workers=args.workers or (SMALL_WORKERS if small else FULL_WORKERS),
            optimizers=args.optimizers or (SMALL_OPTIMIZERS if small else DEFAULT_OPTIMIZERS),
            attacks=args.attacks or (SMALL_ATTACKS if small else ATTACKS),
            seeds=args.seeds,
            steps=args.steps or (SMALL_STEPS if small else FULL_STEPS),
            out=args.out,
        )
    except ValueError as e:
        parser.error(str(e))
    reports = run_jobs([plan.job(*run) for run in plan.runs()])
    rows = collect(plan, reports)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "byzantine.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = markdown(plan, rows)
    (plan.out / "byzantine.md").write_text(table)
    figure(plan, rows, plan.out / "byzantine.png")
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
