"""Which rank is gone: a roll call through the job's key-value store after a failed wait.

Gloo reports a dead peer as a closed connection to an address, and a stalled one as a
timeout; neither names the rank. When a collective fails, every rank that sees it checks
in under a key of its own in the c10d store, then waits PROBE_S for the others. The ranks
that never check in are dead, or stuck outside the collective; the error names them. The
store outlives any worker: a file store (``dlion train``) or torchrun's agent store.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch.distributed as dist

PROBE_S = 2.0
_calls = itertools.count()  # a fresh set of keys for each roll call in this process


def _store() -> Any | None:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no default group, or a torch without the accessor
        return None


def roll_call(group: dist.ProcessGroup | None, world_size: int, probe_s: float = PROBE_S) -> list[int] | None:
    """Global ranks of ``group`` that did not check in within ``probe_s``; None when no
    store can be reached (then nothing is known)."""
    store = _store()
    if store is None:
        return None
    try:
        members = [dist.get_global_rank(group, r) if group is not None else r for r in range(world_size)]
        call = next(_calls)
        keys = {r: f"dlion/roll/{call}/{r}" for r in members}
        store.set(keys[dist.get_rank()], "1")
        deadline = time.monotonic() + probe_s
        while True:
            absent = [r for r in members if not store.check([keys[r]])]
            if not absent or time.monotonic() >= deadline:
                return absent
            time.sleep(0.05)
    except Exception:  # the store itself is gone: the roll call cannot tell
        return None


def absent_text(absent: list[int] | None, probe_s: float = PROBE_S) -> str:
    """The clause an error message adds about the roll call."""
    if absent is None:
        return "no rank could be checked (the job's store is unreachable)"
    if not absent:
        return "every rank answered a roll call, so none is dead: a rank may have diverged"
    names = ", ".join(map(str, absent))
    return f"rank(s) {names} did not answer a roll call within {probe_s:.0f} s (dead or stuck)"
