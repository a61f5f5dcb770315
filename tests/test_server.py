"""The dedicated parameter server: a process of its own, bit-exact, costed, and never hanging."""

from __future__ import annotations

import functools
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_distributed_lion import BUCKET_NUMEL, SHAPES, STEPS, _train, assert_matches_simulation

from multiproc import run_ok, run_ranks
from sim import start_bits


def run_dedicated(
    rank: int, world: int, cases: list[tuple[str, str]], transport: str = "torch", timeout_s: float = 60
) -> list[dict[str, Any]]:
    """Ranks 0..world-2 train each case against the server on the last rank."""
    from dlion.server import ParameterServer, split_server

    out = []
    for vote, tie in cases:
        roles = split_server(transport=transport, timeout=timedelta(seconds=timeout_s))
        if roles.is_server:
            ps = ParameterServer(roles.link)
            served = ps.serve()
            out.append({"served": served, "ledger": ps.ledger.summary(), "steps": ps.ledger.step_bytes()})
        else:
            res = _train(
                rank, world - 1, vote, tie, seed=7, backend="server", transport=transport,
                process_group=roles.workers, server=roles.link,
            )  # fmt: skip
            out.append(res)
    return out


CASES = {
    2: [("majority", "random"), ("majority", "zero"), ("average", "random")],
    3: [("majority", "random"), ("average", "random")],
    4: [("majority", "zero"), ("average", "random")],
}


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_dedicated_server_matches_simulation(workers: int) -> None:
    cases = CASES[workers]
    results = run_ok(run_dedicated, workers + 1, cases=cases)
    assert_matches_simulation(results[:workers], [(v, t, "server") for v, t in cases], workers)
    assert [r["served"] for r in results[workers]] == [STEPS] * len(cases)


def test_dedicated_server_ledger_matches_cost_model() -> None:
    from dlion.compress.buckets import plan_buckets

    workers = 3
    results = run_ok(run_dedicated, workers + 1, cases=[("average", "random")])
    buckets = plan_buckets([int(np.prod(s)) for s in SHAPES], BUCKET_NUMEL)
    s_bytes = sum(b.nbytes for b in buckets)
    planes = 2  # counts of 0..3 positive votes
    header = 24  # (magic, op, step) per exchanging step
    meta = (workers - 1) * (4 + (len(SHAPES) + 7) // 8)  # among the workers only
    first = (workers - 1) * 48 + 8 * (8 + 2 * len(buckets))  # fingerprint and hello, once
    stop, totals = 24, 64  # after the last step
    numel = sum(int(np.prod(s)) for s in SHAPES)
    for rank in range(workers):
        led = results[rank][0]["ledger"]
        up = down = start_bits(workers, len(SHAPES)) // 8  # among the workers
        assert led["bytes_sent"] == STEPS * (s_bytes + header + meta) + first + stop + up
        assert led["bytes_received"] == (
            STEPS * (planes * s_bytes + meta) + (workers - 1) * 48 + 16 + totals + down
        )
        assert led["sent_bytes_by_kind"]["payload"] == STEPS * numel / 8  # they start equal
    server = results[workers][0]
    # Per step the server receives N S (+ headers) and sends N B S: docs/design.md's gather and broadcast.
    assert server["steps"] == [(workers * planes * s_bytes, workers * (s_bytes + header))] * STEPS
    hello = workers * (8 * (8 + 2 * len(buckets)))
    assert server["ledger"]["bytes_received"] == STEPS * workers * (s_bytes + header) + hello + workers * stop
    assert server["ledger"]["bytes_sent"] == STEPS * workers * planes * s_bytes + workers * (16 + totals)
    # Every worker got the server's totals when it closed.
    for rank in range(workers):
        got = results[rank][0]["server_totals"]
        assert got["bytes_sent"] == server["ledger"]["bytes_sent"] and got["steps"] == STEPS


def _worker_dies(
    rank: int, world: int, victim: int, stall_s: float, mode: str = "kill", done_dir: str = ""
) -> dict[str, Any]:
    """The victim (a worker or the server) is SIGKILLed, or a worker goes silent, at step 2;
    the others report how they end (and, given ``done_dir``, leave a file there when they do)."""
    out = _worker_dies_inner(rank, world, victim, stall_s, mode, done_dir)
    if done_dir:
        Path(done_dir, f"rank{rank}").touch()
    return out


def _silent(step: int, *, stall_s: float, done_dir: str, others: list[int]) -> None:
    """The silent worker's begin_step: no word for 3 stall_s, or until every other rank has
    ended (their files in ``done_dir``), whichever comes first."""
    deadline = time.monotonic() + 3 * stall_s
    while time.monotonic() < deadline:
        if done_dir and all(Path(done_dir, f"rank{r}").exists() for r in others):
            return
        time.sleep(0.02)


def _worker_dies_inner(
    rank: int, world: int, victim: int, stall_s: float, mode: str, done_dir: str
) -> dict[str, Any]:
    from dlion import DistributedLion
    from dlion.server import ParameterServer, split_server

    roles = split_server(timeout=timedelta(seconds=stall_s))
    start = time.monotonic()
    try:
        if roles.is_server:
            if rank == victim and mode == "kill":
                time.sleep(3)  # workers are mid-exchange by now
                os.kill(os.getpid(), signal.SIGKILL)
            ParameterServer(roles.link).serve()
        else:
            p = torch.nn.Parameter(torch.zeros(1000))
            opt = DistributedLion(
                [p], lr=0.1, backend="server", process_group=roles.workers, server=roles.link
            )
            for step in range(1000):
                if step == 2 and rank == victim and mode == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == 2 and rank == victim:  # silent after the metadata exchange
                    others = [r for r in range(world) if r != victim]
                    opt._server.begin_step = functools.partial(  # type: ignore
                        _silent, stall_s=stall_s, done_dir=done_dir, others=others
                    )
                p.grad = torch.randn(1000)
                opt.step()
                time.sleep(0.01)
            opt.close()
        return {"error": None, "elapsed": time.monotonic() - start}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "elapsed": time.monotonic() - start}


@pytest.mark.parametrize("victim", [1, 2], ids=["worker", "server"])
def test_killed_process_fails_everyone_else_in_bounded_time(victim: int) -> None:
    timeout_s = 20.0
    out = run_ranks(_worker_dies, 3, timeout_s=90, lost=1, victim=victim, stall_s=timeout_s)
    assert out[victim] == ("lost", None)
    for rank, (status, value) in enumerate(out):
        if rank == victim:
            continue
        assert status == "ok", value
        assert value["error"] is not None, f"rank {rank} finished although rank {victim} was killed"
        assert value["elapsed"] < timeout_s + 10, value
        if rank == 2:  # the server names the worker it lost
            assert "WorkerLost" in value["error"] and f"worker rank {victim}" in value["error"], value
        else:
            assert "CollectiveTimeout" in value["error"], value


def test_silent_worker_is_named_by_the_server_after_the_timeout(tmp_path: Path) -> None:
    stall_s = 5.0
    kw = {"victim": 1, "stall_s": stall_s, "mode": "stall", "done_dir": str(tmp_path)}
    out = run_ranks(_worker_dies, 3, timeout_s=90, **kw)
    status, server = out[2]
    assert status == "ok" and server["error"] is not None, server
    assert server["error"].startswith("WorkerLost") and "step header from worker rank 1" in server["error"]
    assert "worker rank 0" not in server["error"], server  # rank 0 had sent its header
    assert stall_s - 1 < server["elapsed"] < stall_s + 10, server
    # The worker waiting for the server's reply fails too, once the server is gone.
    assert out[0][0] == "ok" and "CollectiveTimeout" in out[0][1]["error"], out[0]


def test_hello_round_trips_and_bad_headers_are_named() -> None:
    from dlion.server import FORMAT, MAGIC, Hello, header_error

    hello = Hello(3, "average", "zero", 11, 2, ((32, 200), (16, 7)))
    header, layout = hello.encode()
    assert Hello.decode(header.tolist(), layout.tolist()) == hello
    assert header_error(header.tolist()) is None
    bad_magic = [0x1234, *header.tolist()[1:]]
    assert "not a dlion worker" in str(header_error(bad_magic))
    other_version = [MAGIC, FORMAT + 1, *header.tolist()[2:]]
    assert "mixed dlion versions" in str(header_error(other_version))


def test_server_link_needs_the_server_backend() -> None:
    from dlion import DistributedLion
    from dlion.server import ServerLink

    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="needs backend='server', not 'sharded'"):
        DistributedLion([p], backend="sharded", server=ServerLink(comm=None, server_rank=1))
