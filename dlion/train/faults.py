"""Faults injected on purpose, so tests can check that launchers stop a job and name the rank
(set through the environment; nothing happens when they are unset)."""

from __future__ import annotations

import os
import signal

# Test hook: the rank named here raises at the step named (default 0), so tests can
# check that the launcher stops the job and names the rank.
FAULT_RANK_ENV = "DLION_FAULT_RANK"
FAULT_STEP_ENV = "DLION_FAULT_STEP"
# With this set to a path, the fault fires once: a restarted job (Ray, torchrun) goes on.
FAULT_ONCE_ENV = "DLION_FAULT_ONCE_FILE"
# "raise" (default): an exception the rank reports; "kill": SIGKILL, the rank says nothing;
# "checkpoint-kill": SIGKILL while the checkpoint of that step is being written.
FAULT_KIND_ENV = "DLION_FAULT_KIND"
CHECKPOINT_KILL = "checkpoint-kill"


def fault_due(rank: int, step: int) -> bool:
    if os.environ.get(FAULT_RANK_ENV) != str(rank) or os.environ.get(FAULT_STEP_ENV, "0") != str(step):
        return False
    once = os.environ.get(FAULT_ONCE_ENV)
    if once is not None:
        try:  # the first process to create the file faults; a restarted one goes on
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
    return True


def inject_fault(rank: int, step: int) -> None:
    """At the start of a step: raise, or SIGKILL this rank."""
    kind = os.environ.get(FAULT_KIND_ENV, "raise")
    if kind == CHECKPOINT_KILL or not fault_due(rank, step):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault on rank {rank} at step {step} ({FAULT_RANK_ENV})")


def inject_checkpoint_fault(rank: int, step: int) -> None:
    """SIGKILL this rank after it wrote its checkpoint files, before the others agree on them."""
    if os.environ.get(FAULT_KIND_ENV) == CHECKPOINT_KILL and fault_due(rank, step):
        os.kill(os.getpid(), signal.SIGKILL)
