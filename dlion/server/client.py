"""The worker's side of a dedicated parameter server: how to reach it, and the client."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dlion.aggregate.votes import BucketWire
from dlion.ledger import CollectiveRecord, Ledger, Traffic
from dlion.server.protocol import MAGIC, OP_STEP, OP_STOP, Hello, totals_summary
from dlion.transport import make_comm


@dataclass(frozen=True)
class ServerLink:
    """How a worker reaches a dedicated server: a transport over workers and server."""

    comm: Any  # TorchComm or MpiComm over every process of the job
    server_rank: int

    @property
    def n_workers(self) -> int:
        return int(self.comm.world_size) - 1


@dataclass(frozen=True)
class Roles:
    """This process's part in a job with a dedicated server (see ``split_server``)."""

    is_server: bool
    workers: Any  # the workers' process group or MPI communicator; None on the server
    link: ServerLink


def split_server(*, transport: str = "torch", timeout: timedelta | None = None) -> Roles:
    """Call on every process of the job: the last rank becomes the server.

    torch: the workers' process group comes from ``dist.new_group`` (every rank must call
    it). mpi: ``COMM_WORLD.Split``; the server's share is COMM_NULL.
    """
    comm = make_comm(None, timeout, transport)
    if comm is None or comm.world_size < 2:
        raise ValueError("a dedicated parameter server needs at least 2 processes: 1+ workers and the server")
    server = comm.world_size - 1
    is_server = comm.rank == server
    if transport == "mpi":
        from mpi4py import MPI

        from dlion.transport.mpi_comm import MpiComm

        assert isinstance(comm, MpiComm)
        workers = comm.comm.Split(MPI.UNDEFINED if is_server else 0, comm.rank)
        workers = None if is_server else workers
    else:
        workers = dist.new_group(list(range(server)))
        workers = None if is_server else workers
    return Roles(is_server, workers, ServerLink(comm, server))


class ServerClient:
    """The worker's end of the link to a dedicated server; records the worker's bytes."""

    def __init__(self, link: ServerLink, ledger: Ledger) -> None:
        self.link, self.ledger = link, ledger
        self.server_totals: dict[str, Any] | None = None

    def _send(self, buf: torch.Tensor, what: str) -> None:
        comm = self.link.comm
        comm.wait_all([comm.isend(buf, self.link.server_rank, f"{what} to the parameter server")])

    def _recv(self, buf: torch.Tensor, what: str) -> torch.Tensor:
        comm = self.link.comm
        buf = buf.to(comm.device)
        comm.wait_all([comm.irecv(buf, self.link.server_rank, f"{what} from the parameter server")])
        return buf

    def hello(self, hello: Hello) -> None:
        header, layout = hello.encode()
        self._send(header, "hello")
        self._send(layout, "bucket layout")
        ack = self._recv(torch.zeros(2, dtype=torch.int64), "hello ack").cpu().tolist()
        bits = 64 * (header.numel() + layout.numel())
        self.ledger.record(
            CollectiveRecord("hello", "send", 2, Traffic(metadata=bits), Traffic(metadata=128))
        )
        if ack != [MAGIC, 0]:
            raise ValueError(f"the parameter server refused this worker's hello (reply {ack}); see its log")

    def begin_step(self, step: int) -> None:
        self._send(torch.tensor([MAGIC, OP_STEP, step], dtype=torch.int64), f"step {step} header")
        self.ledger.record(CollectiveRecord("step header", "send", 2, Traffic(metadata=192), Traffic()))

    def exchange(self, send: torch.Tensor, wire: BucketWire, result_planes: int) -> torch.Tensor:
        self._send(send, f"{wire.name} bits")
        self.ledger.record(CollectiveRecord(wire.name, "gather", 2, wire.traffic(0, wire.nbytes), Traffic()))
        planes = torch.empty((result_planes, wire.nbytes), dtype=torch.uint8)
        planes = self._recv(planes, f"{wire.name} result").to(send.device)
        down = wire.traffic(0, wire.nbytes, result_planes)
        self.ledger.record(CollectiveRecord(wire.name, "broadcast", 2, Traffic(), down))
        return planes

    def close(self) -> dict[str, Any]:
        """Tell the server this worker is done; returns the server's totals once every worker is."""
        if self.server_totals is None:
            self._send(torch.tensor([MAGIC, OP_STOP, -1], dtype=torch.int64), "stop")
            totals = self._recv(torch.zeros(8, dtype=torch.int64), "server totals").cpu().tolist()
            received = Traffic(metadata=64 * len(totals))
            self.ledger.record_extra(CollectiveRecord("stop", "send", 2, Traffic(metadata=192), received))
            if totals[0] != MAGIC:
                raise ValueError(f"malformed server totals {totals}")
            self.server_totals = totals_summary(totals[1:])
        return self.server_totals
