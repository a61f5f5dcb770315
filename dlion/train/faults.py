"""A testing seam: faults the training job injects into itself when the environment asks.

This is not a feature for users. Tests use it to check what launchers do when a rank fails:
that the job stops, that the failing rank is named, that a restarted job resumes. The faults
must fire inside the job's own worker processes, which the launchers under test start
(``dlion train``, torchrun, mpiexec, Ray, the emulated cluster), so the only channel that
reaches them all is the environment. With ``DLION_FAULT_RANK`` unset (always, outside tests)
``planned_faults`` returns None, the loop calls nothing, and no other variable is read.

The variables:

``DLION_FAULT_RANK``
    The global rank that fails. Unset: no fault anywhere.
``DLION_FAULT_STEP``
    When, as the number of steps completed (default 0: before the first step). A fault of
    kind ``raise`` or ``kill`` fires at the start of the next step; ``checkpoint-kill`` fires
    while the checkpoint of that step is written.
``DLION_FAULT_KIND``
    ``raise`` (default): a RuntimeError, which the rank reports (its error file, exit
    status 1). ``kill``: SIGKILL, so the rank says nothing. ``checkpoint-kill``: SIGKILL after
    this rank wrote its checkpoint files, before the ranks agree on them.
``DLION_FAULT_ONCE_FILE``
    A path: only the process that creates this file faults, so a job restarted by its
    launcher (torchrun ``--max-restarts``, Ray's FailureConfig) runs on past the step.

The tests that use it: tests/test_train.py (``dlion train`` names a failing and a killed
worker), tests/test_checkpoint.py (resume after a fault, a torchrun restart, a kill while
writing a checkpoint), tests/test_mpi.py (mpiexec names a killed rank), tests/test_ray.py
(Ray restarts the group and restores each rank's momentum) and tests/test_netcluster.py (the
emulated cluster names the failing host). Ray forwards every ``DLION_`` variable to its
workers (launch.ray_job.FORWARDED_PREFIX).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

FAULT_RANK_ENV = "DLION_FAULT_RANK"
FAULT_STEP_ENV = "DLION_FAULT_STEP"
FAULT_KIND_ENV = "DLION_FAULT_KIND"
FAULT_ONCE_ENV = "DLION_FAULT_ONCE_FILE"
RAISE, KILL, CHECKPOINT_KILL = "raise", "kill", "checkpoint-kill"
KINDS = (RAISE, KILL, CHECKPOINT_KILL)


@dataclass(frozen=True)
class Faults:
    """The fault planned for this rank: its kind, after how many steps, and the once-file."""

    rank: int
    step: int
    kind: str
    once_file: str | None

    def at_step(self, done: int) -> None:
        """At the start of a step, ``done`` steps completed: raise, or SIGKILL this rank."""
        if self.kind != CHECKPOINT_KILL and self._due(done):
            if self.kind == KILL:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault on rank {self.rank} at step {done} ({FAULT_RANK_ENV})")

    def checkpoint_written(self, step: int) -> None:
        """After this rank wrote the checkpoint of ``step``: SIGKILL it, if that is the plan."""
        if self.kind == CHECKPOINT_KILL and self._due(step):
            os.kill(os.getpid(), signal.SIGKILL)

    def _due(self, step: int) -> bool:
        if step != self.step:
            return False
        if self.once_file is not None:
            try:  # the first process to create the file faults; a restarted one goes on
                os.close(os.open(self.once_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return False
        return True


def planned_faults(rank: int) -> Faults | None:
    """This rank's fault from the environment; None when none is planned for it (the usual case).

    A malformed setting raises ValueError naming the variable: a test that meant to inject a
    fault must not pass because the fault silently never fired."""
    target = os.environ.get(FAULT_RANK_ENV)
    if target is None:
        return None
    kind = os.environ.get(FAULT_KIND_ENV, RAISE)
    if kind not in KINDS:
        raise ValueError(f"{FAULT_KIND_ENV}={kind!r} must be one of {', '.join(KINDS)}")
    try:
        chosen, step = int(target), int(os.environ.get(FAULT_STEP_ENV, "0"))
    except ValueError:
        raise ValueError(f"{FAULT_RANK_ENV} and {FAULT_STEP_ENV} must be integers") from None
    if chosen != rank:
        return None
    return Faults(rank, step, kind, os.environ.get(FAULT_ONCE_ENV))
