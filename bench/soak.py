"""Soak: thousands of steps on a small model; nothing may grow with the step count.

    python -m bench.soak [--small] [--steps 3000] [--workers 4]
        [--optimizer dlion-mavo] [--backend sharded] [--out DIR]

Runs one `dlion train` job on a small byte-level model and reads its report, whose
``resources`` section holds every rank's resident memory, open descriptors and threads at
each validation step (dlion.train.resources). Checks, per rank, after the warm-up (the
first WARMUP_FRACTION of the steps): resident memory within 5% of its warm-up value,
descriptors and threads no more than at warm-up; and that the ledger's totals equal the
sum of its per-step bytes. Writes DIR/soak.json and DIR/soak.md; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common.jobs import Job, run_jobs, train_argv
from dlion.aggregate.backends import BACKENDS
from dlion.worker.catalogue import OPTIMIZER_NAMES

RSS_GROWTH_LIMIT = 0.05
WARMUP_FRACTION = 0.2
# Small enough that thousands of steps take minutes on 2 cores: about 30k parameters.
MODEL_FLAGS = ["--task", "bytes", "--d-model", "32", "--layers", "1", "--heads", "2", "--context", "32"]
MODEL_FLAGS += ["--batch-size", "4", "--eval-batches", "1", "--data-bytes", "200000"]
FULL_STEPS, SMALL_STEPS, SAMPLES = 3000, 300, 30


@dataclass(frozen=True, kw_only=True)
class RankCheck:
    rank: int
    rss_warm: int
    rss_max_after: int
    fds_warm: int
    fds_max_after: int
    threads_warm: int
    threads_max_after: int

    @property
    def rss_growth(self) -> float:
        return self.rss_max_after / self.rss_warm - 1.0

    @property
    def ok(self) -> bool:
        return (
            self.rss_growth <= RSS_GROWTH_LIMIT
            and self.fds_max_after <= self.fds_warm
            and self.threads_max_after <= self.threads_warm
        )


def check_ranks(resources: dict[str, Any], steps: int) -> list[RankCheck]:
    """Each rank's figures at the first sample after warm-up against the largest after it."""
    sampled = resources["steps"]
    start = next((i for i, s in enumerate(sampled) if s >= WARMUP_FRACTION * steps), None)
    if start is None or start == len(sampled) - 1:
        warm = f"step {WARMUP_FRACTION * steps:.0f}"
        raise ValueError(f"need samples after the warm-up ({warm}); got samples at steps {sampled}")
    checks = []
    for rank, (rss, fds, threads) in enumerate(
        zip(resources["rss_bytes"], resources["fds"], resources["threads"], strict=True)
    ):
        checks.append(
            RankCheck(
                rank=rank,
                rss_warm=rss[start],
                rss_max_after=max(rss[start:]),
                fds_warm=fds[start],
                fds_max_after=max(fds[start:]),
                threads_warm=threads[start],
                threads_max_after=max(threads[start:]),
            )
        )
    return checks


def ledger_consistent(report: dict[str, Any]) -> bool:
    """Rank 0's totals equal the sum of its per-step bytes and its one-off messages (the
    first step's parameter broadcast), both ways."""
    led = report["ledger"]
    sent = sum(s for s, _ in report["step_bytes"]) + led["one_off_bytes_sent"]
    received = sum(r for _, r in report["step_bytes"]) + led["one_off_bytes_received"]
    return (sent, received) == (led["bytes_sent"], led["bytes_received"])


def markdown(report: dict[str, Any], checks: list[RankCheck], ledger_ok: bool) -> str:
    cfg = report["config"]
    lines = [
        f"Soak: {cfg['optimizer']} ({cfg['backend']}), {cfg['world_size']} workers, {cfg['steps']} steps, "
        f"{report['n_params']:,} parameters; warm-up: the first {WARMUP_FRACTION:.0%} of the steps",
        "",
        "| rank | RSS at warm-up (MB) | max after (MB) | growth | fds | threads | ok |",
        "|--:|--:|--:|--:|--:|--:|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c.rank} | {c.rss_warm / 1e6:.1f} | {c.rss_max_after / 1e6:.1f} | {c.rss_growth:+.2%} "
            f"| {c.fds_warm} -> {c.fds_max_after} | {c.threads_warm} -> {c.threads_max_after} | {c.ok} |"
        )
    lines += ["", f"Ledger totals equal the sum of per-step bytes: {ledger_ok}"]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help=f"{SMALL_STEPS} steps (for CI)")
    p.add_argument("--steps", type=int, default=None, help=f"default: {FULL_STEPS}")
    p.add_argument("--workers", type=int, default=4, help="default: %(default)s")
    p.add_argument("--optimizer", choices=OPTIMIZER_NAMES, default="dlion-mavo", help="default: %(default)s")
    p.add_argument("--backend", choices=tuple(BACKENDS), default="sharded", help="default: %(default)s")
    p.add_argument("--out", type=Path, default=Path("bench-results/soak"), help="default: %(default)s")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    steps = args.steps or (SMALL_STEPS if args.small else FULL_STEPS)
    if steps < 10 or args.workers < 1:
        parser.error(f"need --steps >= 10 and --workers >= 1; got {steps} and {args.workers}")
    flags = [*MODEL_FLAGS, "--optimizer", args.optimizer, "--steps", str(steps)]
    flags += ["--eval-every", str(max(1, steps // SAMPLES))]
    if args.optimizer != "lion":
        flags += ["--backend", args.backend]
    run = args.out / "run"
    label = f"soak {args.optimizer} w{args.workers} {steps} steps"
    job = Job(label, train_argv(flags, workers=args.workers, out=run), run)
    job.report.unlink(missing_ok=True)  # a soak measures fresh processes: never reuse an old run
    (report_path,) = run_jobs([job])
    report = json.loads(report_path.read_text())
    checks = check_ranks(report["resources"], steps)
    ledger_ok = ledger_consistent(report)
    text = markdown(report, checks, ledger_ok)
    summary = {
        "ok": ledger_ok and all(c.ok for c in checks),
        "ledger_consistent": ledger_ok,
        "ranks": [{**c.__dict__, "rss_growth": c.rss_growth, "ok": c.ok} for c in checks],
        "steps": steps,
        "workers": args.workers,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "soak.md").write_text(text)
    print(text, end="")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
