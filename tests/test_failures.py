"""A rank that stops answering turns into a clear error within the timeout, never a hang."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import dlion
from dlion.transport import liveness

from multiproc import run_ranks

STALL_S = 8.0


def _rank1_stalls_in_exchange(rank: int, world: int, backend: str, done: str) -> dict[str, object]:
    p = torch.nn.Parameter(torch.ones(100))
    opt = dlion.DistributedLion([p], timeout=timedelta(seconds=3), backend=backend)
    p.grad = torch.ones(100)
    opt.step()  # both ranks take one step together
    if rank == 1:
        # Rank 1 passes the metadata exchange, then stalls where the backend's own
        # collective should start, and leaves: once rank 0 has given up (the file ``done``),
        # or after STALL_S, whichever comes first. Rank 0 must give up first either way.
        def stall(*args: Any, **kwargs: Any) -> Any:
            deadline = time.monotonic() + STALL_S
            while time.monotonic() < deadline and not os.path.exists(done):
                time.sleep(0.02)
            raise RuntimeError("rank 1 stalled on purpose")

        opt._exchange = stall  # type: ignore[method-assign]
    start = time.monotonic()
    error = None
    try:
        opt.step()
    except RuntimeError as err:
        error = f"{type(err).__name__}: {err}"
    out = {"error": error, "elapsed": time.monotonic() - start}
    if rank == 0:
        Path(done).touch()
    return out


@pytest.mark.parametrize(
    ("backend", "collective"),
    [("allgather", "bucket0 all_gather"), ("sharded", "bucket0 all_to_all"), ("server", "bucket0 gather")],
)
def test_stalled_rank_times_out_in_the_backend_collective(
    backend: str, collective: str, tmp_path: Path
) -> None:
    done = str(tmp_path / "rank0-done")
    out = run_ranks(_rank1_stalls_in_exchange, 2, timeout_s=90, backend=backend, done=done)
    status, value = out[0]
    assert status == "ok", value
    assert value["error"] is not None and "CollectiveTimeout" in value["error"], value
    assert "rank 0/2" in value["error"] and collective in value["error"]
    assert "rank(s) 1 did not answer a roll call" in value["error"], value  # stuck outside it
    assert value["elapsed"] < STALL_S


def _killed_at_step_two(rank: int, world: int, optimizer: str, backend: str) -> dict[str, object]:
    from dlion.worker.catalogue import build_optimizer

    p = torch.nn.Parameter(torch.zeros(1000))
    timeout = timedelta(seconds=KILL_TIMEOUT_S)
    opt = build_optimizer(optimizer, [p], lr=0.01, weight_decay=0.0, backend=backend, timeout=timeout)
    start = time.monotonic()
    try:
        for step in range(100):
            if step == 2 and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)  # no goodbye: sockets close with the process
            start = time.monotonic()
            p.grad = torch.randn(1000)
            opt.step()
    except RuntimeError as err:
        return {"error": f"{type(err).__name__}: {err}", "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


KILL_TIMEOUT_S = 5.0


@pytest.mark.parametrize(
    ("optimizer", "backend"),
    [
        ("dlion-mavo", "allgather"),
        ("dlion-mavo", "sharded"),
        ("dlion-avg", "server"),
        ("adamw-global", "allgather"),
        ("terngrad", "allgather"),
        ("dgc", "server"),
    ],
)
def test_killed_rank_is_named_by_every_survivor_within_the_timeout(optimizer: str, backend: str) -> None:
    out = run_ranks(_killed_at_step_two, 3, timeout_s=60, lost=1, optimizer=optimizer, backend=backend)
    assert out[1] == ("lost", None)
    for rank in (0, 2):
        status, value = out[rank]
        assert status == "ok", value
        assert value["error"] is not None and "CollectiveTimeout" in value["error"], value
        named = re.search(r"rank\(s\) ([\d, ]+) did not answer a roll call", value["error"])
        assert named is not None and "1" in named.group(1).split(", "), value["error"]
        assert str(rank) not in named.group(1).split(", "), value["error"]  # a survivor answers
        assert value["elapsed"] < KILL_TIMEOUT_S + liveness.PROBE_S + 3, value
