"""Seconds per step from a short timed run, and the time a long run takes to reach a step.

A step's wall time is the slowest rank's: the ranks meet at every collective. Ranks that meet
every step are timed per step (the slowest rank's time each step, median over the timed
steps); ranks that meet once per round of H local steps are timed per round (the slowest
rank's sum over the round), since between meetings each runs at its own pace. PowerSGD all-
reduces fp32 gradients for its first ``start_iter`` steps: those are timed as a phase of
their own (median over steps 3..start_iter of the timing run), and a long run pays them for
as many steps as its own warm-up lasted.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

WARM_FROM = 3  # the first warm step timed


@dataclass(frozen=True, kw_only=True)
class StepTime:
    """steady_s per step, after ``warm_steps`` steps of warm_s each (the run's one-off phase)."""

    steady_s: float
    warm_s: float = 0.0
    warm_steps: int = 0

    def time_to(self, step: int) -> float:
        """Seconds from the first step to the end of ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        warm = min(step, self.warm_steps)
        return warm * self.warm_s + (step - warm) * self.steady_s

    def with_warm_steps(self, warm_steps: int) -> StepTime:
        """The same per-step times for a run whose warm-up phase lasts ``warm_steps``."""
        return StepTime(steady_s=self.steady_s, warm_s=self.warm_s, warm_steps=warm_steps)


def slowest_rank(by_rank: Sequence[Sequence[float]], first: int, last: int, segment: int) -> list[float]:
    """Per segment of ``segment`` steps in steps first..last (1-based, whole segments only):
    the slowest rank's seconds per step over the segment."""
    if segment < 1 or first < 1:
        raise ValueError(f"need segment >= 1 and first >= 1, got {segment}, {first}")
    out = []
    for start in range(first, last - segment + 2, segment):
        sums = [sum(rank[start - 1 : start - 1 + segment]) for rank in by_rank]
        out.append(max(sums) / segment)
    return out


def measured_step_time(
    report: dict[str, Any], *, skip: int, segment: int = 1, warm_steps: int = 0
) -> StepTime:
    """From a timing run's report: the median slowest-rank time per step after the first
    ``skip`` steps (``segment``: steps per meeting, aligned to step 1), and with ``warm_steps``
    (>= 3) the median over steps 3..warm_steps as the warm phase's time per step: the first two
    carry start-up (DDP rebuilds its buckets after the first)."""
    by_rank = report.get("step_time_s_by_rank") or [report["step_time_s"]]
    steps = len(by_rank[0])
    first = skip + 1
    if segment < 1 or warm_steps in (1, 2) or warm_steps < 0:
        raise ValueError(f"need segment >= 1 and warm_steps 0 or >= 3, got {segment}, {warm_steps}")
    if first % segment != 1 % segment:
        raise ValueError(f"skip={skip} must be a multiple of the segment ({segment}): rounds start at step 1")
    steady = slowest_rank(by_rank, first, steps, segment)
    if not steady:
        raise ValueError(f"a run of {steps} steps has no whole segment of {segment} after step {skip}")
    warm_s = 0.0
    if warm_steps:
        if warm_steps > skip:
            raise ValueError(f"the warm phase ({warm_steps} steps) must end by step skip={skip}")
        warm_s = statistics.median(slowest_rank(by_rank, WARM_FROM, warm_steps, 1))
    return StepTime(steady_s=statistics.median(steady), warm_s=warm_s, warm_steps=warm_steps)


def compute_time(report: dict[str, Any]) -> float:
    """A run without meetings but its last step: each rank's median step over steps 2..last-1,
    the slowest rank's. That is the step's compute as the emulated hosts share the cores."""
    by_rank = report.get("step_time_s_by_rank") or [report["step_time_s"]]
    if len(by_rank[0]) < 3:
        raise ValueError(f"the compute run needs at least 3 steps, has {len(by_rank[0])}")
    return max(statistics.median(rank[1:-1]) for rank in by_rank)
