"""A rank that stops answering turns into a clear error within the timeout, never a hang."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest
import torch

import dlion

from multiproc import run_ranks

STALL_S = 8.0


def _rank1_stalls_in_exchange(rank: int, world: int, backend: str) -> dict[str, object]:
    p = torch.nn.Parameter(torch.ones(100))
    opt = dlion.DistributedLion([p], timeout=timedelta(seconds=3), backend=backend)
    p.grad = torch.ones(100)
    opt.step()  # both ranks take one step together
    if rank == 1:
        # Rank 1 passes the metadata exchange, then stalls where the backend's own
        # collective should start, and leaves.
        def stall(*args: Any, **kwargs: Any) -> Any:
            time.sleep(STALL_S)
            raise RuntimeError("rank 1 stalled on purpose")

        opt._exchange = stall  # type: ignore[method-assign]
    start = time.monotonic()
    try:
        opt.step()
    except RuntimeError as err:
        return {"error": f"{type(err).__name__}: {err}", "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


@pytest.mark.parametrize(
    ("backend", "collective"),
    [("allgather", "bucket0 all_gather"), ("sharded", "bucket0 all_to_all"), ("server", "bucket0 gather")],
)
def test_stalled_rank_times_out_in_the_backend_collective(backend: str, collective: str) -> None:
    out = run_ranks(_rank1_stalls_in_exchange, 2, timeout_s=90, backend=backend)
    status, value = out[0]
    assert status == "ok", value
    assert value["error"] is not None and "CollectiveTimeout" in value["error"], value
    assert "rank 0/2" in value["error"] and collective in value["error"]
    assert value["elapsed"] < STALL_S
