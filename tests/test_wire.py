"""Wrong headers and lengths on the wire, against a live dedicated parameter server (Gloo).

Worker rank 1 of 2 misbehaves in one way; the server (rank 2) must name what and who, and
nobody may apply an update from the bad message.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch

from multiproc import run_ranks


def _rogue(rank: int, world: int, fault: str) -> dict[str, Any]:
    from dlion import DistributedLion
    from dlion import server as ps

    roles = ps.split_server(timeout=timedelta(seconds=10))
    p = torch.nn.Parameter(torch.zeros(100))
    try:
        if roles.is_server:
            ps.ParameterServer(roles.link).serve()
            return {"error": None}
        if rank == 1 and fault == "hello magic":
            encode = ps.Hello.encode
            ps.Hello.encode = lambda self: (
                torch.tensor([0x1234, *encode(self)[0].tolist()[1:]]),
                encode(self)[1],
            )  # type: ignore[method-assign]
        if rank == 1 and fault == "step header":
            ps.ServerClient.begin_step = lambda self, step: self._send(  # type: ignore[method-assign]
                torch.tensor([ps.MAGIC, 99, step], dtype=torch.int64), "step header"
            )
        if rank == 1 and fault == "bits length":
            exchange = ps.ServerClient.exchange
            ps.ServerClient.exchange = (
                lambda self, send, wire, planes: exchange(  # type: ignore[method-assign]
                    self, torch.cat([send, send[:16]]), wire, planes
                )
            )
        opt = DistributedLion([p], lr=0.1, backend="server", process_group=roles.workers, server=roles.link)
        for _ in range(3):
            p.grad = torch.ones(100)
            opt.step()
        opt.close()
        return {"error": None, "moved": bool(p.detach().abs().sum() > 0)}
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}", "moved": bool(p.detach().abs().sum() > 0)}


@pytest.mark.parametrize(
    ("fault", "server_says"),
    [
        ("hello magic", "worker rank 1: bad magic 0x1234: the peer is not a dlion worker"),
        ("step header", "malformed step headers"),
    ],
)
def test_a_malformed_message_is_named_and_applies_nothing(fault: str, server_says: str) -> None:
    out = run_ranks(_rogue, 3, timeout_s=90, fault=fault)
    (s0, w0), (s1, w1), (s2, server) = out
    assert s0 == s1 == s2 == "ok", out
    assert server["error"] is not None and server_says in server["error"], server
    for worker in (w0, w1):
        assert worker["error"] is not None, worker  # every worker fails too, in bounded time
        assert not worker["moved"], worker  # and no update came from the bad message


def test_a_longer_message_kills_the_server_loudly_and_the_workers_fail_in_bounded_time() -> None:
    """Gloo aborts a process that receives more bytes than it posted for ("Received data size
    doesn't match expected size", std::terminate): it cannot be caught, so the server dies
    loudly; every worker must then fail within its timeout, having applied nothing."""
    out = run_ranks(_rogue, 3, timeout_s=90, lost=1, fault="bits length")
    assert out[2] == ("lost", None), out
    for status, worker in out[:2]:
        assert status == "ok" and worker["error"] is not None and not worker["moved"], worker
        assert "CollectiveTimeout" in worker["error"] or "WorkerLost" in worker["error"], worker
