"""Wall clock to quality on declared clusters (issue 27).

    python -m bench.ttq [--study DIR] [--scenarios 25gbe,10gbe,cross-region] [--rows NAMES]
        [--validate ROW@SCENARIO] [--out DIR] [--small] [--dry-run] [--summary-only]

1. The compute run: 4 emulated hosts, one worker each, local steps that never meet: the
   median step of the slowest rank is the step's compute t_c on this machine.
2. Per scenario (``bench.ttq.scenarios``), the link rate at which the fp32 ring all-reduce of
   the model's gradients takes the scenario's ratio times t_c: first the rate at which its
   bytes alone would, then adamw-global's short run there, and the rate scaled by how much
   longer its communication took (the calibration). Per row, at that rate: a short
   run of the row's study flags on ``launch.cluster`` (``bench.ttq.rows``), or for the rows
   under DDP a ``bench.ddp`` variant with the same model and batch (``bench.ttq.ddp``).
3. The time to each target: the step at which the row's convergence run (the local-steps
   study's, ``--study``: the same model, seed and no-repeat text) reached it, times that step
   time (``bench.ttq.report``). ``--validate ROW@SCENARIO`` runs that row's whole convergence
   run on the emulated cluster and sets its measured wall clock beside the product.

Runs are kept under ``--out`` and not run again (stop and continue at will). Writes ttq.md,
ttq.json and ttq.png there. Rows without a convergence run yet are left out and named.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common.flags import check_names, names
from bench.common.jobs import Job, run_jobs, train_argv
from bench.local_study import SMALL_FLAGS, STUDY_FLAGS, cell_flags
from bench.ttq import ddp as D
from bench.ttq import rows as R
from bench.ttq.report import Context, write
from bench.ttq.scenarios import BY_NAME, SCENARIOS, burst_bytes, rate_text
from dlion.train.args import add_train_arguments, config_from_args

COMPUTE_RATE_BITS = 1e9  # the compute run sends nothing until its last step: any rate will do
ALL_ROWS = (*R.ROW_NAMES, *D.BY_NAME)


def cluster_job(label: str, flags: list[str], out: Path, bits: float) -> Job:
    argv = [*flags, "--burst-bytes", str(burst_bytes(bits))]
    return Job(label, train_argv(argv, workers=R.WORKERS, out=out, rate=rate_text(bits)), out)


def _has_curve(ctx: Context, study_row: str) -> bool:
    return ctx.convergence(study_row) is not None


def calibration_jobs(ctx: Context) -> list[Job]:
    """adamw-global's short run at each scenario's nominal rate (``Context.rate_bits``)."""
    flags = R.timing_flags(R.BY_NAME[R.BASELINE], ctx.plan)
    return [
        cluster_job(f"calibrate {sc}", flags, ctx.calibration_dir(sc), ctx.nominal_bits(sc))
        for sc in ctx.args.scenarios
    ]


def jobs(ctx: Context) -> list[Job]:
    """The short timing runs of the job rows, and the validation run."""
    out: list[Job] = []
    for sc in ctx.args.scenarios:
        bits = ctx.rate_bits(sc)
        for r in ctx.job_rows:
            if _has_curve(ctx, r.name):
                out.append(
                    cluster_job(
                        f"{r.name} at {sc}", R.timing_flags(r, ctx.plan), ctx.steps_dir(sc, r.name), bits
                    )
                )
    if ctx.args.validate is not None and (ref := ctx.convergence(ctx.args.validate[0])) is not None:
        row, sc = ctx.args.validate  # the study run again, its steps included
        flags = cell_flags(ctx.plan, R.BY_NAME[row].cell(int(ref["config"]["steps"])))
        out.append(cluster_job(f"validate {row} at {sc}", flags, ctx.validate_dir(), ctx.rate_bits(sc)))
    return out


def ddp_model(plan: Any) -> dict[str, int]:
    """The study's model shape and batch, as bench.ddp takes them."""
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    cfg = config_from_args(p.parse_args(list(plan.flags)))
    if (cfg.context, cfg.heads) != (128, 4):
        raise ValueError(
            f"bench.ddp trains 128-byte windows with 4 heads; the study: {cfg.context}, {cfg.heads}"
        )
    return {"d_model": cfg.d_model, "layers": cfg.layers, "batch": cfg.batch_size}


def measure_ddp(ctx: Context, *, dry_run: bool) -> None:
    for sc in ctx.args.scenarios:
        bits = ctx.rate_bits(sc)
        for r in ctx.ddp_rows:
            path = D.result_path(ctx.run_root(sc), r)
            if path.exists() or not _has_curve(ctx, r.curve):
                continue
            print(f"{r.name} at {sc}: bench.ddp {r.variant} at {rate_text(bits)}", flush=True)
            if not dry_run:
                D.measure(
                    r, path, rate=rate_text(bits), burst_bytes=burst_bytes(bits), model=ddp_model(ctx.plan)
                )


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ttq", description=__doc__.split("\n\n")[0])
    p.add_argument("--study", type=Path, default=Path("bench-results/local-study"),
                   help="the local-steps study's --out (default: %(default)s)")  # fmt: skip
    p.add_argument("--scenarios", type=names, default=tuple(s.name for s in SCENARIOS), help="default: all")
    p.add_argument(
        "--rows", type=names, default=None, help=f"default: {','.join(ALL_ROWS)} (no DDP rows with --small)"
    )
    p.add_argument("--validate", default=None, help="ROW@SCENARIO: one whole run on the emulated cluster")
    p.add_argument("--out", type=Path, default=None, help="default: bench-results/ttq (-small with --small)")
    p.add_argument("--small", action="store_true", help="the study's --small model and data (a smoke run)")
    p.add_argument("--dry-run", action="store_true", help="print the runs' commands; run none")
    p.add_argument("--summary-only", action="store_true", help="run nothing; sum up what is there")
    args = p.parse_args(argv)
    args.out = args.out or Path("bench-results/ttq-small" if args.small else "bench-results/ttq")
    args.rows = args.rows or (R.ROW_NAMES if args.small else ALL_ROWS)
    try:
        check_names("scenarios", args.scenarios, tuple(BY_NAME))
        check_names("rows", args.rows, ALL_ROWS)
    except ValueError as e:
        p.error(str(e))
    if args.small and (ddp := [n for n in args.rows if n in D.BY_NAME]):
        p.error(f"--small trains a model bench.ddp does not have: leave out {', '.join(ddp)}")
    if args.validate is not None:
        row, _, sc = args.validate.partition("@")
        if row not in args.rows or row not in R.BY_NAME or sc not in args.scenarios:
            p.error(f"--validate must be ROW@SCENARIO with ROW one of this run's job rows "
                    f"{[n for n in args.rows if n in R.BY_NAME]} and SCENARIO one of its scenarios "
                    f"{list(args.scenarios)}, got {args.validate!r}")  # fmt: skip
        args.validate = (row, sc)
    return args


def check_compute(ctx: Context) -> None:
    """The compute run must be of the study's model: its rates are set from it."""
    base = ctx.convergence(R.BASELINE)
    assert base is not None  # main checks it first
    if ctx.compute["n_params"] != base["n_params"]:
        raise ValueError(
            f"{ctx.args.out / 'compute'} timed a model of {ctx.compute['n_params']:,} parameters, the study "
            f"{ctx.args.study} one of {base['n_params']:,}: give another --out (or remove that folder)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    plan = R.study_plan(args.study, flags=SMALL_FLAGS if args.small else STUDY_FLAGS)
    base = R.convergence_dir(R.BY_NAME[R.BASELINE], plan) / "report.json"
    if not base.exists():
        print(f"bench.ttq: no {R.BASELINE} run at {base}: run bench.local_study first", file=sys.stderr)
        return 1
    compute_job = cluster_job("compute", R.compute_flags(plan), args.out / "compute", COMPUTE_RATE_BITS)
    if args.dry_run:
        print(" ".join(compute_job.argv))
    elif not args.summary_only:
        run_jobs([compute_job])
    if not compute_job.report.exists():
        print("no compute run yet: the rates follow from it", file=sys.stderr)
        return 0 if args.dry_run else 1
    ctx = Context(args=args, plan=plan, compute=json.loads(compute_job.report.read_text()))
    check_compute(ctx)
    calibrate = calibration_jobs(ctx)
    if args.dry_run:
        print("\n".join(" ".join(job.argv) for job in calibrate))
    elif not args.summary_only:
        run_jobs(calibrate)
    if not all(job.report.exists() for job in calibrate):
        print("no calibration runs yet: the rates follow from them", file=sys.stderr)
        return 0 if args.dry_run else 1
    todo = jobs(ctx)
    if args.dry_run:
        print("\n".join(" ".join(job.argv) for job in todo))
    elif not args.summary_only:
        run_jobs(todo)
    if not args.summary_only:
        measure_ddp(ctx, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"wrote {write(ctx)}")
    return 0
