"""The table's rows: which convergence run of the local-steps study each one reads its loss
curve from, and how a short run on the emulated cluster times its steps.

Every row trains the study's language model on the same streamed, no-repeat text, so its loss
against step comes from ``bench.local_study``'s run (same flags, same seed). Its step time
comes from a short run of the same flags on ``launch.cluster`` at a scenario's rate: the
network changes when a step ends, never what it computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench import local_study as study

WORKERS = 4  # the study's deciding runs, and the emulated hosts (one worker each)


@dataclass(frozen=True, kw_only=True)
class Timing:
    """How a row's short run is timed: ``skip`` steps first (start-up; whole rounds for a local
    row), then ``timed`` steps; ``segment``: steps per meeting (H for a local row)."""

    skip: int
    timed: int
    segment: int = 1
    warm_steps: int = 0  # PowerSGD: its fp32 phase in the timing run (its lr warm-up, shortened)

    def __post_init__(self) -> None:
        for name, low in (("skip", 1), ("timed", 1), ("segment", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Timing.{name} must be an int >= {low}, got {value!r}")
        if self.skip % self.segment or self.timed % self.segment:
            raise ValueError(
                f"skip={self.skip} and timed={self.timed} must be whole rounds of {self.segment}"
            )
        if self.warm_steps and not 3 <= self.warm_steps <= self.skip:
            raise ValueError(f"warm_steps must be 0 or in [3, skip={self.skip}], got {self.warm_steps}")

    @property
    def steps(self) -> int:
        return self.skip + self.timed


@dataclass(frozen=True, kw_only=True)
class TtqRow:
    name: str
    study_row: str  # bench.local_study's row
    outer_lr: float | None = None  # the study cell's, for a local row (as given to --outer-lr)
    timing: Timing

    def cell(self, steps: int, seed: int = 0) -> study.Cell:
        row = study.ROWS[study.ROW_NAMES.index(self.study_row)]
        return study.Cell(row, WORKERS, self.outer_lr, seed, steps)


def _fp32() -> Timing:
    # Every step is the same fp32 all-reduce: few steps time it well, and at the cross-region
    # rate each costs tens of seconds.
    return Timing(skip=1, timed=3)


def _local(h: int) -> Timing:
    return Timing(skip=h, timed=2 * h, segment=h)


ROWS: tuple[TtqRow, ...] = (
    TtqRow(name="adamw-global", study_row="adamw-global", timing=_fp32()),
    TtqRow(name="lion-global", study_row="lion-global", timing=_fp32()),
    TtqRow(name="powersgd-r1", study_row="powersgd-r1", timing=Timing(skip=7, timed=12, warm_steps=5)),
    TtqRow(name="powersgd-r4", study_row="powersgd-r4", timing=Timing(skip=7, timed=12, warm_steps=5)),
    TtqRow(name="dlion-mavo", study_row="dlion-mavo", timing=Timing(skip=4, timed=24)),
    TtqRow(name="diloco-h16", study_row="diloco-h16", outer_lr=0.7, timing=_local(16)),
    TtqRow(name="dlion-local-h16", study_row="dlion-local-h16", outer_lr=8.0, timing=_local(16)),
    TtqRow(name="dlion-local-h16-ef", study_row="dlion-local-h16-ef", outer_lr=8.0, timing=_local(16)),
)
ROW_NAMES = tuple(r.name for r in ROWS)
CALIBRATION = ROWS[0].timing  # adamw-global's: its fp32 all-reduce sets each scenario's rate
BY_NAME = {r.name: r for r in ROWS}
BASELINE = "adamw-global"

# The compute run: local Lion steps that never meet before the last step (which the job ends
# with a vote, and which is left out), so a step is forward, backward and the local update.
COMPUTE_ROW = TtqRow(
    name="compute", study_row="dlion-local-h16", outer_lr=8.0, timing=Timing(skip=1, timed=23)
)


def study_plan(study_dir: Path, flags: tuple[str, ...] = study.STUDY_FLAGS) -> study.Plan:
    return study.Plan(
        rows=("adamw-global",),
        workers=(WORKERS,),
        seeds=(0,),
        local_grid=(0.5,),
        diloco_grid=(0.7,),
        out=study_dir,
        flags=flags,
    )


def convergence_dir(row: TtqRow, plan: study.Plan, seed: int = 0) -> Path:
    """The study's run of this row (its report is the loss curve)."""
    return plan.run_dir(row.cell(plan.steps_at(WORKERS), seed))


def timing_flags(row: TtqRow, plan: study.Plan) -> list[str]:
    """The row's study flags for a short run: its steps, one small evaluation at the end."""
    t = row.timing
    flags = study.cell_flags(plan, row.cell(t.steps))
    flags += ["--eval-every", str(t.steps), "--eval-batches", "1"]
    if t.warm_steps:
        flags += ["--warmup-steps", str(t.warm_steps)]  # PowerSGD's fp32 phase follows it
    return flags


def compute_flags(plan: study.Plan) -> list[str]:
    return [*timing_flags(COMPUTE_ROW, plan), "--local-steps", str(10 * COMPUTE_ROW.timing.steps)]
