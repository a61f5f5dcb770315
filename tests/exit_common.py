"""What the exit scripts and tests/test_exit.py share: the names of this process's threads.

ProcessGroupGloo runs its collectives on worker threads named ``pt_gloo_runloop``. A finished
collective can still be owned by one of them for a moment; if the interpreter is finalizing
when that thread lets go of the collective's Python tensors, the thread is ended mid-destructor
and the process aborts ("terminate called without an active exception"). destroy_process_group()
joins them, unless something else still holds the process group. With none left, nothing of
Gloo's can abort the exit."""

from __future__ import annotations

import gc
import os

RUNLOOP = "pt_gloo_runloop"


def thread_name(native_id: int) -> str:
    """The kernel's name for a thread of this process (Linux); "" once it has ended."""
    try:
        with open(f"/proc/self/task/{native_id}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def runloops() -> int:
    """Gloo worker threads alive in this process (-1 where /proc cannot tell)."""
    gc.collect()  # a group kept only by a reference cycle is gone once collected
    try:
        return sum(thread_name(int(tid)) == RUNLOOP for tid in os.listdir("/proc/self/task"))
    except OSError:
        return -1
