"""The time-to-quality report: step times from the runs on disk, the tables, the plot, the
validation line and the projection (ttq.md, ttq.json, ttq.png)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.local_study import Plan
from bench.ttq import ddp as D
from bench.ttq import projection
from bench.ttq import rows as R
from bench.ttq.scenarios import (
    BY_NAME,
    MAX_RATE_BITS,
    MIN_RATE_BITS,
    derivation_table,
    emulated_rate_bits,
    rate_text,
)
from bench.ttq.summary import TARGETS, Cell, as_json, make_cell, plot, steps_to, table
from bench.ttq.timing import StepTime, compute_time, measured_step_time
from dlion.ledger import fp32_ring_bits_per_param


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


@dataclass
class Context:
    """One invocation: its flags, the study's plan, the compute run's report."""

    args: argparse.Namespace
    plan: Plan
    compute: dict[str, Any]
    _runs: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    _rates: dict[str, float] = field(default_factory=dict)

    @property
    def job_rows(self) -> list[R.TtqRow]:
        return [R.BY_NAME[n] for n in self.args.rows if n in R.BY_NAME]

    @property
    def ddp_rows(self) -> list[D.DdpRow]:
        return [D.BY_NAME[n] for n in self.args.rows if n in D.BY_NAME]

    @property
    def compute_s(self) -> float:
        return compute_time(self.compute)

    def nominal_bits(self, scenario: str) -> float:
        """The rate at which the fp32 all-reduce's bytes alone would take the declared time."""
        fp32_bytes = fp32_ring_bits_per_param(R.WORKERS) * self.compute["n_params"] / 8
        return emulated_rate_bits(BY_NAME[scenario], allreduce_bytes=fp32_bytes, compute_s=self.compute_s)

    def calibration_dir(self, scenario: str) -> Path:
        return self.args.out / "calibrate" / scenario

    def rate_bits(self, scenario: str) -> float:
        """The calibrated rate: the links carry the all-reduce slower than their tbf rate
        (headers, TCP, Gloo's own work), so adamw-global's step is timed at the nominal rate
        first and the rate scaled until its communication takes the declared multiple of t_c.
        Read once per scenario: every run folder and job of it is named by this rate."""
        if scenario in self._rates:
            return self._rates[scenario]
        cal = _load(self.calibration_dir(scenario) / "report.json")
        if cal is None:
            where = self.calibration_dir(scenario)
            raise ValueError(f"no calibration run in {where}: run bench.ttq without --summary-only")
        comm = measured_step_time(cal, skip=R.CALIBRATION.skip).steady_s - self.compute_s
        declared = BY_NAME[scenario].ratio * self.compute_s
        if not comm > 0:
            raise ValueError(f"{scenario}: adamw-global's step at the nominal rate is not longer than t_c")
        bits = self.nominal_bits(scenario) * comm / declared
        if not MIN_RATE_BITS <= bits <= MAX_RATE_BITS:
            raise ValueError(
                f"{scenario}: the calibrated rate {bits / 1e3:,.0f} kbit/s is outside what the links shape"
            )
        self._rates[scenario] = bits
        return bits

    def run_root(self, scenario: str) -> Path:
        """Where a scenario's runs at its calibrated rate live (another rate, another folder)."""
        return self.args.out / "runs" / f"{scenario}-{rate_text(self.rate_bits(scenario))}"

    def convergence(self, study_row: str) -> dict[str, Any] | None:
        """The study's run of a job row (by name), its loss curve; None while it has none."""
        if study_row not in self._runs:
            self._runs[study_row] = _load(R.convergence_dir(R.BY_NAME[study_row], self.plan) / "report.json")
        return self._runs[study_row]

    def steps_dir(self, scenario: str, row: str) -> Path:
        return self.run_root(scenario) / row

    def validate_dir(self) -> Path:
        row, sc = self.args.validate
        return self.run_root(sc) / "validate" / row


def _warm_steps(run: dict[str, Any]) -> int:
    return max(2, int(run["config"]["warmup_steps"]))  # PowerSGD's fp32 phase follows the lr warm-up


def step_times(ctx: Context, sc: str) -> dict[str, tuple[StepTime, str, int]]:
    """Per row measured at ``sc``: its StepTime, the study row whose curve it follows, and its
    steps per meeting."""
    out: dict[str, tuple[StepTime, str, int]] = {}
    for r in ctx.job_rows:
        timing, run = _load(ctx.steps_dir(sc, r.name) / "report.json"), ctx.convergence(r.name)
        if timing is None or run is None:
            continue
        t = r.timing
        st = measured_step_time(timing, skip=t.skip, segment=t.segment, warm_steps=t.warm_steps)
        out[r.name] = (st.with_warm_steps(_warm_steps(run)) if t.warm_steps else st, r.name, t.segment)
    for d in ctx.ddp_rows:
        path, run = D.result_path(ctx.run_root(sc), d), ctx.convergence(d.curve)
        if path.exists() and run is not None:
            out[d.name] = (StepTime(steady_s=D.step_time(json.loads(path.read_text()))), d.curve, 1)
    return out


def write(ctx: Context) -> Path:
    base = ctx.convergence(R.BASELINE)
    if base is None:
        raise ValueError(f"no {R.BASELINE} convergence run in {ctx.args.study}: run bench.local_study first")
    base_loss = float(base["final_val_loss"])
    emulated = (
        f"Emulated: {R.WORKERS} hosts, one worker each; step compute t_c = {ctx.compute_s:.3f} s (the "
        f"compute run's slowest rank, median); model {ctx.compute['n_params']:,} parameters."
    )
    parts = ["# Time to quality", "", derivation_table(), "", emulated, ""]
    cells: list[Cell] = []
    times: dict[tuple[str, str], StepTime] = {}
    curves: dict[str, list[list[float]]] = {}
    for sc in ctx.args.scenarios:
        bits, sc_cells = ctx.rate_bits(sc), []
        for name, (st, curve, segment) in step_times(ctx, sc).items():
            run = ctx.convergence(curve)
            assert run is not None  # step_times keeps only rows with a curve
            times[(sc, name)], curves[name] = st, run["val_loss"]
            one_off = run["ledger"]["one_off_bytes_sent"] * 8 / bits
            sc_cells.append(make_cell(BY_NAME[sc], name, run, st, baseline_loss=base_loss, one_off_s=one_off,
                                      segment=segment))  # fmt: skip
        cells += sc_cells
        rate = f"{rate_text(bits)} (calibrated; nominal {rate_text(ctx.nominal_bits(sc))})"
        parts += [table(BY_NAME[sc], sc_cells, baseline=R.BASELINE, rate_text=rate), ""]
        if (sc, R.BASELINE) in times:
            got = (times[(sc, R.BASELINE)].steady_s - ctx.compute_s) / ctx.compute_s
            parts += [f"adamw-global's step here: (step - t_c) / t_c = {got:.2f} (declared "
                      f"{BY_NAME[sc].ratio:.2f}).", ""]  # fmt: skip
    missing = [r.name for r in ctx.job_rows if ctx.convergence(r.name) is None]
    missing += [f"{d.name} (follows {d.curve})" for d in ctx.ddp_rows if ctx.convergence(d.curve) is None]
    if missing:
        parts += [f"No convergence run yet (left out): {', '.join(missing)}.", ""]
    out = ctx.args.out
    out.mkdir(parents=True, exist_ok=True)
    plot(
        [BY_NAME[s] for s in ctx.args.scenarios], curves, times, baseline_loss=base_loss, path=out / "ttq.png"
    )
    parts += ["![](ttq.png)", *validation(ctx, times), "", *projected(ctx, base_loss)]
    (out / "ttq.json").write_text(json.dumps({"compute_s": ctx.compute_s, "cells": as_json(cells)}, indent=1))
    (out / "ttq.md").write_text("\n".join(parts) + "\n")
    return out / "ttq.md"


def validation(ctx: Context, times: dict[tuple[str, str], StepTime]) -> list[str]:
    if ctx.args.validate is None:
        return []
    row, sc = ctx.args.validate
    full, st, ref = _load(ctx.validate_dir() / "report.json"), times.get((sc, row)), ctx.convergence(row)
    if full is None or st is None or ref is None:
        return ["", f"Validation, {row} at {sc}: not run yet."]
    steps = len(full["step_time_s"])
    product, measured = st.time_to(steps), float(full["train_time_s"])
    same = full["param_sha256"] == ref["param_sha256"]
    return ["", f"Validation, {row} at {sc}: the whole {steps}-step run on the emulated cluster took "
            f"{measured / 60:.1f} min of steps; its steps times the short run's step time give "
            f"{product / 60:.1f} min ({100 * (product - measured) / measured:+.1f}%). Its final parameters "
            f"are {'bit for bit' if same else 'NOT'} those of the study's run."]  # fmt: skip


def projected(ctx: Context, base_loss: float) -> list[str]:
    label, factor = TARGETS[-1]
    reached = {}
    for r in R.ROWS:
        run = ctx.convergence(r.name)
        if run is not None:
            reached[r.name] = steps_to(run["val_loss"], base_loss * factor)
    intro = (projection.__doc__ or "").split("\n\n")[1].replace("\n", " ")
    parts = ["## Projected to 64..1,024 GPUs", "", intro, ""]
    for sc in ctx.args.scenarios:
        parts += [projection.table(BY_NAME[sc], reached, label=f"{label} ({base_loss * factor:.4f})"), ""]
    return parts
