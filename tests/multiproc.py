"""Run a function on N local Gloo ranks (forked processes) with bounded waits.

The ranks are forked from one helper process, spawned once per test session, that has
imported dlion, torch (torch._dynamo included, which the first optimizer pulls in) and
Numba, and set up Numba's CPU target. A rank then starts in a fraction of a second instead
of the several seconds of imports a freshly spawned interpreter spends, which on a 2-core
CI machine is most of a small multi-rank test. The helper runs no Numba parallel region
and no torch operation, so its forked ranks start as clean as spawned ones: GNU OpenMP,
which refuses to run in a child forked after it was used, is first used in the rank.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist

JOIN_S = 10  # how long a rank may take to exit after its result, before it is killed

# What every rank would otherwise import for itself (a module that is missing is skipped).
_WARM_MODULES = (
    "dlion",
    "dlion.worker.catalogue",
    "dlion.kernels",
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "numba",
    "numpy",
)


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


def _forked_entry(conn: Connection, *args: Any) -> None:
    conn.close()  # the helper's end of the pipe to the test process stays the helper's
    _entry(*args)


def _openmp_used() -> bool:
    """Whether Numba's parallel layer started in this process: forked children could not use
    GNU OpenMP then (it terminates them), so ranks must be spawned instead."""
    import numba.np.ufunc.parallel

    return bool(numba.np.ufunc.parallel._is_initialized)


def _run_in_helper(
    conn: Connection, fn: Callable[..., Any], world: int, timeout_s: float, lost: int, kwargs: dict[str, Any]
) -> dict[int, tuple[str, Any]]:
    """Start the ranks, collect world - lost results, then reap every rank."""
    # Forked, unless importing fn's module ran a Numba parallel kernel in the helper.
    ctx = mp.get_context("spawn" if _openmp_used() else "fork")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_forked_entry, args=(conn, fn, r, world, store, q, kwargs))
            if ctx.get_start_method() == "fork"
            else ctx.Process(target=_entry, args=(fn, r, world, store, q, kwargs))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        conn.send(("pids", [p.pid for p in procs]))
        results: dict[int, tuple[str, Any]] = {}
        try:
            for _ in range(world - lost):
                try:
                    rank, status, value = q.get(timeout=timeout_s)
                except queue.Empty:
                    missing = [r for r in range(world) if r not in results]
                    raise TimeoutError(f"ranks {missing} sent no result within {timeout_s} s") from None
                results[rank] = (status, value)
        finally:
            for p in procs:
                p.join(timeout=JOIN_S)
                if p.is_alive():
                    p.kill()
                    p.join()
            q.close()
    return results


def _helper(conn: Connection) -> None:
    """The helper process: warm up once, then start a set of ranks per request."""
    import numba

    for name in _WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    numba.njit(lambda x: x + 1)(1)  # Numba's CPU target set-up, once; no parallel region
    while True:
        try:
            request = conn.recv_bytes()
        except EOFError:  # the test process is gone
            return
        try:
            # The ranks see the test process as it is now, as spawned ones would.
            path, cwd, env, payload = pickle.loads(request)
            sys.path[:] = path
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            fn, world, timeout_s, lost, kwargs = pickle.loads(payload)
            reply = ("done", _run_in_helper(conn, fn, world, timeout_s, lost, kwargs))
        except BaseException as err:
            reply = ("failed", f"{type(err).__name__}: {err}\n{traceback.format_exc()}")
        conn.send(reply)


_helper_proc: Any = None
_helper_conn: Connection | None = None


def _stop_helper(pids: list[int] | None = None) -> None:
    """Close the pipe (the helper then exits), and kill it and the given ranks if it does not."""
    global _helper_proc, _helper_conn
    proc, conn = _helper_proc, _helper_conn
    _helper_proc = _helper_conn = None
    if conn is not None:
        conn.close()
    for pid in pids or []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc is not None:
        if pids is not None:
            proc.kill()
        proc.join(timeout=JOIN_S)
        if proc.is_alive():
            proc.kill()
            proc.join()


atexit.register(_stop_helper)  # runs before multiprocessing's own exit hook, which joins it


def _connection() -> Connection:
    global _helper_proc, _helper_conn
    if _helper_proc is None or not _helper_proc.is_alive():
        _stop_helper()
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        _helper_proc = ctx.Process(target=_helper, args=(theirs,), name="multiproc-helper")
        _helper_proc.start()
        theirs.close()
        _helper_conn = ours
    assert _helper_conn is not None
    return _helper_conn


def run_ranks(
    fn: Callable[..., Any], world: int, timeout_s: float = 120, lost: int = 0, **kwargs: Any
) -> list[Any]:
    """fn(rank=, world=, **kwargs) on each rank; (status, value) by rank, or raises.

    ``lost`` ranks are expected to die without reporting: theirs read ("lost", None).
    Each of the world - lost results may take up to ``timeout_s`` after the previous one.
    """
    conn = _connection()
    payload = pickle.dumps((fn, world, timeout_s, lost, kwargs))
    conn.send_bytes(pickle.dumps((list(sys.path), os.getcwd(), dict(os.environ), payload)))
    # The helper's own waits are bounded; this bound only catches a helper that hangs.
    budget = 120 + (world - lost) * timeout_s + world * 2 * JOIN_S
    pids: list[int] = []
    try:
        while True:
            if not conn.poll(budget):
                raise TimeoutError(f"the rank helper did not answer within {budget} s")
            try:
                kind, value = conn.recv()
            except EOFError:
                code = _helper_proc.exitcode if _helper_proc is not None else None
                raise RuntimeError(f"the rank helper exited (exit code {code}); see its stderr") from None
            if kind != "pids":
                break
            pids = value
    except BaseException:  # a hung helper, or the test interrupted (pytest-timeout): start afresh
        _stop_helper(pids)
        raise
    if kind == "failed":
        raise RuntimeError(f"running {world} ranks failed:\n{value}")
    results = {r: (s, pickle.loads(v) if s == "ok" else v) for r, (s, v) in value.items()}
    return [results.get(r, ("lost", None)) for r in range(world)]


def run_ok(fn: Callable[..., Any], world: int, **kwargs: Any) -> list[Any]:
    out = run_ranks(fn, world, **kwargs)
    errors = [v for s, v in out if s != "ok"]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [v for _, v in out]
