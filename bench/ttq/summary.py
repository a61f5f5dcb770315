"""Time to quality: the study's loss against step times the emulated cluster's step time.

For each scenario and row: the step time (``bench.ttq.timing``), the first evaluated step at
which the row's validation loss reaches each target (adamw-global's final loss, and 1% and 2%
above it; evaluations every 100 steps, so a step count is the first evaluation at or below the
target), the time to it (plus the one-off bytes at the link's rate), and how much sooner than
adamw-global that is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common.plots import panels, save
from bench.ttq.scenarios import Scenario
from bench.ttq.timing import StepTime

TARGETS: tuple[tuple[str, float], ...] = (("adamw final", 1.0), ("+1%", 1.01), ("+2%", 1.02))


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One row at one scenario."""

    scenario: str
    row: str
    step_s: float  # steady seconds per step
    warm_s: float
    warm_steps: int
    final_val_loss: float
    steps_to: tuple[int | None, ...]  # per target; None: not reached in the run
    time_to_s: tuple[float | None, ...]
    run_steps: int
    run_time_s: float  # the whole convergence run's steps at this step time


def steps_to(val_loss: Sequence[Sequence[float]], target: float) -> int | None:
    """The first evaluated step (after step 0) whose validation loss is at or below target."""
    for step, loss in val_loss:
        if step > 0 and loss <= target:
            return int(step)
    return None


def make_cell(
    scenario: Scenario,
    row: str,
    convergence: dict[str, Any],
    step_time: StepTime,
    *,
    baseline_loss: float,
    one_off_s: float,
    segment: int = 1,
) -> Cell:
    """``segment``: steps per meeting. A local-step run is scored on the ranks' consensus, the
    parameters of its last meeting, so a loss evaluated at step s was reached at the meeting
    at or before s, and is charged that meeting's time."""
    curve = convergence["val_loss"]
    steps = [steps_to(curve, baseline_loss * f) for _, f in TARGETS]
    run_steps = len(convergence["step_time_s"])
    met = [None if s is None else segment * (s // segment) for s in steps]
    return Cell(
        scenario=scenario.name,
        row=row,
        step_s=step_time.steady_s,
        warm_s=step_time.warm_s,
        warm_steps=step_time.warm_steps,
        final_val_loss=float(convergence["final_val_loss"]),
        steps_to=tuple(steps),
        time_to_s=tuple(None if s is None else one_off_s + step_time.time_to(s) for s in met),
        run_steps=run_steps,
        run_time_s=one_off_s + step_time.time_to(run_steps),
    )


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "not reached"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _sooner(cell_s: float | None, base_s: float | None) -> str:
    if cell_s is None or base_s is None:
        return "-"
    return f"{base_s / cell_s:.2f}x"


def table(scenario: Scenario, cells: Sequence[Cell], *, baseline: str, rate_text: str) -> str:
    """Markdown: one scenario's rows."""
    base = next((c for c in cells if c.row == baseline), None)
    head = ["row", "s/step", "final val loss"]
    for label, _ in TARGETS:
        head += [f"steps to {label}", f"time to {label}", "x sooner"]
    lines = [
        f"**{scenario.name}** ({scenario.title}: fp32 all-reduce {scenario.ratio:.2f}x the step's compute; "
        f"emulated at {rate_text} per link)",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "--:|" * (len(head) - 1),
    ]
    for c in cells:
        step = f"{c.step_s:.3f}" + (f" ({c.warm_s:.3f} for the first {c.warm_steps})" if c.warm_steps else "")
        parts = [c.row, step, f"{c.final_val_loss:.4f}"]
        for i in range(len(TARGETS)):
            s = c.steps_to[i]
            parts += [
                str(s) if s is not None else f"> {c.run_steps}",
                _time(c.time_to_s[i]),
                _sooner(c.time_to_s[i], base.time_to_s[i] if base else None),
            ]
        lines.append("| " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot(
    scenarios: Sequence[Scenario],
    curves: dict[str, list[list[float]]],
    times: dict[tuple[str, str], StepTime],
    *,
    baseline_loss: float,
    path: Path,
) -> Path:
    """Validation loss against wall-clock minutes, one panel per scenario."""
    rows = list(curves)
    fig, axes, colors = panels(len(scenarios), rows, (5.0, 3.8))
    for ax, sc in zip(axes, scenarios, strict=True):
        for row in rows:
            st = times.get((sc.name, row))
            if st is None:
                continue
            pts = [(st.time_to(int(s)) / 60, v) for s, v in curves[row] if s > 0]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=row, color=colors[row], lw=1.2)
        for _, f in TARGETS:
            ax.axhline(baseline_loss * f, color="grey", lw=0.6, ls=":")
        ax.set_xscale("log")
        ax.set_ylim(baseline_loss * 0.97, baseline_loss * 1.6)
        ax.set_xlabel("wall clock of the training steps (min, log)")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title(f"{sc.name}: all-reduce {sc.ratio:.1f}x compute", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    return save(fig, path)


def as_json(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(c).items()}
        for c in cells
    ]
