"""A rank that stops answering turns into a clear error within the timeout, never a hang."""

from __future__ import annotations

import time
from datetime import timedelta

import torch

import dlion

from multiproc import run_ranks


def _rank1_stalls(rank: int, world: int) -> dict[str, object]:
    p = torch.nn.Parameter(torch.ones(100))
    opt = dlion.DistributedLion([p], timeout=timedelta(seconds=3))
    p.grad = torch.ones(100)
    opt.step()  # both ranks take one step together
    if rank == 1:
        time.sleep(8)  # stalls past rank 0's timeout, then leaves
        return {"error": None, "elapsed": 0.0}
    start = time.monotonic()
    try:
        opt.step()
    except RuntimeError as err:
        return {"error": f"{type(err).__name__}: {err}", "elapsed": time.monotonic() - start}
    return {"error": None, "elapsed": time.monotonic() - start}


def test_stalled_rank_times_out_with_clear_error() -> None:
    out = run_ranks(_rank1_stalls, 2, timeout_s=90)
    status, value = out[0]
    assert status == "ok", value
    assert value["error"] is not None and "CollectiveTimeout" in value["error"]
    assert "rank 0/2" in value["error"]
    assert value["elapsed"] < 8
