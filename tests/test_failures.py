"""A rank that stops answering turns into a clear error within the timeout, never a hang."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

import dlion

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
    assert value["elapsed"] < STALL_S
