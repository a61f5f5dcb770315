"""Transport over MPI (mpi4py) on NumPy buffers: the same interface as TorchComm.

Collectives are non-blocking (Iallgather, Ialltoall, Igather, Ibcast, Iallreduce) and
polled against a deadline, so a stalled rank is a CollectiveTimeout here too. Launch as
``mpiexec -n N python -m mpi4py ...`` so that one rank's exception aborts the job.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from dlion.transport.base import CollectiveTimeout, Pending, deadline_of

_POLL_S = 2e-4


class MpiComm:
    """The ranks of an MPI communicator (default COMM_WORLD), as seen from this rank."""

    torch_group = None  # not torch.distributed

    def __init__(self, comm: Any = None, timeout: timedelta | None = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as err:  # pragma: no cover - exercised only without the extra
            raise RuntimeError("transport='mpi' needs mpi4py: pip install 'dlion[mpi]'") from err
        self._mpi = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.timeout = timeout
        self.device = torch.device("cpu")

    def _wait(self, req: Any, what: str, deadline: float | None = None, status: Any = None) -> None:
        if deadline is None:
            deadline = deadline_of(self.timeout)
        if deadline is None:
            req.Wait(status)
            return
        while not req.Test(status):
            if time.monotonic() > deadline:
                raise CollectiveTimeout(
                    f"rank {self.rank}/{self.world_size}: {what} did not complete within {self.timeout} "
                    "(MPI): another rank may have died or diverged"
                )
            time.sleep(_POLL_S)

    @staticmethod
    def _array(t: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().numpy())

    def all_gather(self, send: torch.Tensor, what: str) -> torch.Tensor:
        a = self._array(send)
        out = np.empty((self.world_size, *a.shape), a.dtype)
        self._wait(self.comm.Iallgather(a, out), what)
        return torch.from_numpy(out)

    def all_to_all(self, send: torch.Tensor, what: str) -> torch.Tensor:
        a = self._array(send).reshape(-1)
        if a.size % self.world_size:
            raise ValueError(f"{what}: {a.size} elements do not split into {self.world_size} shards")
        out = np.empty((self.world_size, a.size // self.world_size), a.dtype)
        self._wait(self.comm.Ialltoall(a, out), what)
        return torch.from_numpy(out)

    def gather(self, send: torch.Tensor, root: int, what: str) -> torch.Tensor | None:
        a = self._array(send)
        out = np.empty((self.world_size, *a.shape), a.dtype) if self.rank == root else None
        self._wait(self.comm.Igather(a, out, root=root), what)
        return torch.from_numpy(out) if out is not None else None

    def broadcast(self, buf: torch.Tensor, root: int, what: str) -> torch.Tensor:
        a = self._array(buf).copy()
        self._wait(self.comm.Ibcast(a, root=root), what)
        return torch.from_numpy(a)

    def all_reduce_sum(self, buf: torch.Tensor, what: str) -> None:
        a = self._array(buf).copy()
        self._wait(self.comm.Iallreduce(self._mpi.IN_PLACE, a, op=self._mpi.SUM), what)
        buf.copy_(torch.from_numpy(a))

    def isend(self, buf: torch.Tensor, dst: int, what: str) -> Pending:
        a = self._array(buf)
        return Pending(self.comm.Isend(a, dest=dst), torch.from_numpy(a), what, dst)

    def irecv(self, buf: torch.Tensor, src: int, what: str) -> Pending:
        # One byte of room beyond the expected length turns a longer message into a
        # checked length error instead of MPI's truncation abort.
        room = np.empty(buf.numel() * buf.element_size() + 1, np.uint8)
        req = self.comm.Irecv(room, source=src)
        return Pending(req, buf, what, src, expect_bytes=room.size - 1, staging=room)

    def wait_all(self, pending: Sequence[Pending]) -> None:
        """Poll all under one deadline, so the error names the peer that failed or is missing."""
        deadline = deadline_of(self.timeout)
        left = {i: self._mpi.Status() for i in range(len(pending))}
        while left:
            for i, status in list(left.items()):
                if pending[i].work.Test(status):
                    self._check_length(pending[i], status)
                    del left[i]
            if left and deadline is not None and time.monotonic() > deadline:
                missing = ", ".join(pending[i].what for i in left)
                raise CollectiveTimeout(f"rank {self.rank}: no {missing} within {self.timeout} (MPI)")
            if left:
                time.sleep(_POLL_S)

    def _check_length(self, p: Pending, status: Any) -> None:
        if p.expect_bytes < 0:
            return
        got = status.Get_count(self._mpi.BYTE)
        if got != p.expect_bytes:
            raise ValueError(
                f"rank {self.rank}: {p.what} from rank {p.peer} was {got} bytes; expected "
                f"{p.expect_bytes} (the peer runs another model, config or dlion version)"
            )
        p.buf.view(-1).view(torch.uint8).copy_(torch.from_numpy(p.staging[:-1]))
