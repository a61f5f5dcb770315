"""Virtual ranks: N workers in one process, one thread each, taking turns.

``ThreadGroup(n)`` hands out ``n`` ``ThreadComm`` (one per virtual rank) that meet at a
barrier for every collective. The optimizers run unchanged on top, so a vote, its ties, its
coins and the ledger are the ones N processes would have: a 2-core machine can study 32
workers. One baton lets a single rank run at a time (it is released only while a rank waits
at the barrier): Numba's parallel kernels are never launched from two threads at once, and
the ranks do not fight over the cores.

Every wait is bounded by the group's timeout; a rank that fails breaks the barrier, so the
others raise ``CollectiveTimeout`` at once instead of waiting it out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

import torch

from dlion.checks import check_int
from dlion.transport.base import CollectiveTimeout, Pending

T = TypeVar("T")


class ThreadGroup:
    """``world_size`` virtual ranks; ``run(fn)`` calls ``fn(rank)`` on every rank at once."""

    def __init__(self, world_size: int, timeout: timedelta | None = None) -> None:
        check_int("world_size", world_size, low=1)
        self.world_size = world_size
        self.timeout = timeout
        self._barrier = threading.Barrier(world_size)
        self._baton = threading.Lock()
        self._slots: list[Any] = [None] * world_size
        self._pool = ThreadPoolExecutor(max_workers=world_size, thread_name_prefix="dlion-rank")
        self.comms = [ThreadComm(self, r) for r in range(world_size)]

    def run(self, fn: Callable[[int], T]) -> list[T]:
        """``fn(rank)`` for every rank, each on its own thread; the results by rank. The
        first failure (by rank) is raised once every rank has returned or failed."""

        def turn(rank: int) -> T:
            with self._baton:
                try:
                    return fn(rank)
                except BaseException:
                    self._barrier.abort()  # peers waiting on this rank fail now
                    raise

        futures = [self._pool.submit(turn, r) for r in range(self.world_size)]
        errors = [f.exception() for f in futures]
        if self._barrier.broken:
            self._barrier.reset()
        first = next((e for e in errors if e is not None and not isinstance(e, CollectiveTimeout)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return [f.result() for f in futures]

    def exchange(self, rank: int, value: Any, what: str) -> list[Any]:
        """Every rank's ``value``, by rank: the one collective the others are made of."""
        self._slots[rank] = value
        self._wait(rank, what)
        values = list(self._slots)
        self._wait(rank, what)  # nobody writes the next collective's slot before all have read
        return values

    def _wait(self, rank: int, what: str) -> None:
        seconds = None if self.timeout is None else self.timeout.total_seconds()
        self._baton.release()
        try:
            self._barrier.wait(seconds)
        except threading.BrokenBarrierError:
            raise CollectiveTimeout(
                f"virtual rank {rank}/{self.world_size}: {what} failed: another rank failed "
                f"or did not arrive within {self.timeout}"
            ) from None
        finally:
            self._baton.acquire()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ThreadComm:
    """One virtual rank of a ThreadGroup, as a dlion ``Comm``. Sums run in rank order, so
    results are deterministic (the same from run to run, not Gloo's summation order)."""

    device = torch.device("cpu")
    torch_group = None  # not torch.distributed

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank
        self.world_size = group.world_size
        self.timeout = group.timeout

    def all_gather(self, send: torch.Tensor, what: str) -> torch.Tensor:
        return torch.stack(self.group.exchange(self.rank, send.detach().cpu().reshape(-1), what))

    def all_to_all(self, send: torch.Tensor, what: str) -> torch.Tensor:
        rows = self.group.exchange(self.rank, send.detach().cpu().reshape(self.world_size, -1), what)
        return torch.stack([row[self.rank] for row in rows])

    def gather(self, send: torch.Tensor, root: int, what: str) -> torch.Tensor | None:
        rows = self.all_gather(send, what)
        return rows if self.rank == root else None

    def broadcast(self, buf: torch.Tensor, root: int, what: str) -> torch.Tensor:
        return self.group.exchange(self.rank, buf.detach().cpu(), what)[root].clone()

    def all_reduce_sum(self, buf: torch.Tensor, what: str) -> None:
        parts = self.group.exchange(self.rank, buf.detach().cpu().clone(), what)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        buf.copy_(total)

    def isend(self, buf: torch.Tensor, dst: int, what: str) -> Pending:
        raise NotImplementedError(
            f"{what}: virtual ranks have no point-to-point messages (a dedicated parameter server); "
            "use backend 'sharded', 'allgather' or 'server' on rank 0"
        )

    def irecv(self, buf: torch.Tensor, src: int, what: str) -> Pending:
        return self.isend(buf, src, what)

    def wait_all(self, pending: Sequence[Pending]) -> None:
        if pending:
            raise NotImplementedError("virtual ranks have no point-to-point messages")
