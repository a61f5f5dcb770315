"""Run a function on N local Gloo ranks (spawned processes) with bounded waits."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def _entry(fn: Callable[..., Any], rank: int, world: int, store: str, q: Any, kwargs: dict[str, Any]) -> None:
    import numba

    numba.set_num_threads(1)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        # Plain pickle bytes: torch's queue pickler would share tensors through file
        # descriptors that die with this process.
        q.put((rank, "ok", pickle.dumps(fn(rank=rank, world=world, **kwargs))))
    except BaseException as err:  # report every failure to the parent, then exit
        q.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world: int, timeout_s: float = 120, lost: int = 0, **kwargs: Any
) -> list[Any]:
    """fn(rank=, world=, **kwargs) on each rank; (status, value) by rank, or raises.

    ``lost`` ranks are expected to die without reporting: theirs read ("lost", None).
    """
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, store, q, kwargs)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, tuple[str, Any]] = {}
        try:
            for _ in range(world - lost):
                rank, status, value = q.get(timeout=timeout_s)
                results[rank] = (status, pickle.loads(value) if status == "ok" else value)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [results.get(r, ("lost", None)) for r in range(world)]


def run_ok(fn: Callable[..., Any], world: int, **kwargs: Any) -> list[Any]:
    out = run_ranks(fn, world, **kwargs)
    errors = [v for s, v in out if s != "ok"]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [v for _, v in out]
