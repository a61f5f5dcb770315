"""A dedicated parameter server: a process of its own that trains nothing.

Workers are ranks 0..N-1 of the job and the server is rank N. They talk point to point;
every message is a flat buffer whose length both sides know before it is sent:

  hello   worker -> server, once: int64[8] header, then int64[2 n_buckets] layout
  ack     server -> worker, once: int64[2] (magic, status)
  step    worker -> server, per exchanging step: int64[3] (magic, op, step)
  bits    worker -> server, per bucket: uint8[S]
  result  server -> worker, per bucket: uint8[B, S]
  totals  server -> worker, after op STOP: int64[8] (magic, steps, bits sent and received
          by kind), so the job's report carries the server's traffic

A worker sends S and receives B S per bucket; the server receives N S and sends N B S
(DESIGN.md's gather to a server and flat broadcast), recorded in its own ledger. When
every worker sends op STOP (``DistributedLion.close()``) the loop ends cleanly; a worker
that dies or goes silent is a ``WorkerLost`` naming its rank within the timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dlion.compress.sign import TIE_STREAM
from dlion.compress.sign_ops import ops_for
from dlion.kernels import derive_key
from dlion.server.comm import CollectiveTimeout, Pending, world_comm
from dlion.server.ledger import NO_TRAFFIC, CollectiveRecord, Ledger, Traffic
from dlion.server.topology import BucketWire

MAGIC = 0x644C696F6E5053  # "dLionPS"
FORMAT = 1  # bump when these messages change
OP_STEP, OP_STOP = 1, 2
VOTE_CODES = {"majority": 0, "average": 1}
TIE_CODES = {"random": 0, "zero": 1}
_HEADER = 8


class WorkerLost(CollectiveTimeout):
    """A worker died or went silent while the parameter server waited for it."""


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
    comm = world_comm(None, timeout, transport)
    if comm is None or comm.world_size < 2:
        raise ValueError("a dedicated parameter server needs at least 2 processes: 1+ workers and the server")
    server = comm.world_size - 1
    is_server = comm.rank == server
    if transport == "mpi":
        from mpi4py import MPI

        workers = comm.comm.Split(MPI.UNDEFINED if is_server else 0, comm.rank)
        workers = None if is_server else workers
    else:
        workers = dist.new_group(list(range(server)))
        workers = None if is_server else workers
    return Roles(is_server, workers, ServerLink(comm, server))


@dataclass(frozen=True)
class Hello:
    """What the server must know before the first bucket: identical from every worker."""

    n_workers: int
    vote: str
    tie: str
    seed: int
    result_planes: int
    buckets: tuple[tuple[int, int], ...]  # (bytes, payload bits) per bucket

    def encode(self) -> tuple[torch.Tensor, torch.Tensor]:
        header = [MAGIC, FORMAT, self.n_workers, VOTE_CODES[self.vote], TIE_CODES[self.tie]]
        header += [self.seed, self.result_planes, len(self.buckets)]
        layout = [v for b in self.buckets for v in b]
        return torch.tensor(header, dtype=torch.int64), torch.tensor(layout, dtype=torch.int64)

    @staticmethod
    def decode(header: list[int], layout: list[int]) -> Hello:
        votes = {v: k for k, v in VOTE_CODES.items()}
        ties = {v: k for k, v in TIE_CODES.items()}
        pairs = tuple(zip(layout[0::2], layout[1::2], strict=True))
        return Hello(header[2], votes[header[3]], ties[header[4]], header[5], header[6], pairs)


def _header_error(header: list[int]) -> str | None:
    if header[0] != MAGIC:
        return f"bad magic {header[0]:#x}: the peer is not a dlion worker"
    if header[1] != FORMAT:
        return f"message format {header[1]} differs from this server's {FORMAT}: mixed dlion versions"
    if header[3] not in VOTE_CODES.values() or header[4] not in TIE_CODES.values() or header[7] < 0:
        return f"malformed hello header {header}"
    return None


def totals_summary(values: list[int]) -> dict[str, Any]:
    """The server's totals message as a ledger-like summary, in bytes."""
    steps, sp, spad, smeta, rp, rpad, rmeta = values
    return {
        "steps": steps,
        "bytes_sent": (sp + spad + smeta) // 8,
        "bytes_received": (rp + rpad + rmeta) // 8,
        # Sign bits carry no indices or scalers.
        "sent_bytes_by_kind": {"payload": sp / 8, "padding": spad / 8, "metadata": smeta / 8}
        | {"indices": 0.0, "scalers": 0.0},
        "received_bytes_by_kind": {"payload": rp / 8, "padding": rpad / 8, "metadata": rmeta / 8}
        | {"indices": 0.0, "scalers": 0.0},
    }


def _full(nbytes: int, payload_bits: int) -> Traffic:
    return Traffic(payload=payload_bits, padding=8 * nbytes - payload_bits)


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


class ParameterServer:
    """The server's loop: receive every worker's bits, vote, send the result back."""

    def __init__(self, link: ServerLink) -> None:
        if link.comm.rank != link.server_rank:
            raise ValueError(f"rank {link.comm.rank} is a worker; the server is rank {link.server_rank}")
        self.link = link
        self.comm = link.comm
        self.workers = list(range(link.n_workers))
        self.ledger = Ledger()
        self.steps_served = 0

    def _gather(self, shape: tuple[int, ...], dtype: torch.dtype, what: str) -> torch.Tensor:
        """One message from each worker into row r, waited for in rank order."""
        out = torch.empty((len(self.workers), *shape), dtype=dtype, device=self.comm.device)
        pending = [self.comm.irecv(out[r], r, f"{what} from worker rank {r}") for r in self.workers]
        self._wait(pending)
        return out

    def _wait(self, pending: list[Pending]) -> None:
        try:
            self.comm.wait_all(pending)
        except CollectiveTimeout as err:
            raise WorkerLost(f"parameter server: {err}") from err

    def _reply(self, buf: torch.Tensor, what: str) -> None:
        self._wait([self.comm.isend(buf, r, f"{what} to worker rank {r}") for r in self.workers])

    def _handshake(self) -> Hello:
        headers = self._gather((_HEADER,), torch.int64, "hello").cpu().tolist()
        bad = {r: e for r, h in enumerate(headers) if (e := _header_error(h))}
        problems = [f"worker rank {r}: {e}" for r, e in bad.items()]
        # A worker whose header is sound sends its layout next: take it, or that worker
        # would block in the send and the real problem would surface as a timeout.
        layouts = {}
        for r in (r for r in self.workers if r not in bad):
            buf = torch.empty(2 * headers[r][7], dtype=torch.int64, device=self.comm.device)
            self._wait([self.comm.irecv(buf, r, f"layout from worker rank {r}")])
            layouts[r] = buf.cpu().tolist()
        if not problems:
            problems += [
                f"worker rank {r} sent {h + layouts[r]}, rank 0 sent {headers[0] + layouts[0]}"
                for r, h in enumerate(headers)
                if (h, layouts[r]) != (headers[0], layouts[0])
            ]
        if not problems and headers[0][2] != len(self.workers):
            problems.append(f"workers count {headers[0][2]} of themselves, the job has {len(self.workers)}")
        n = len(self.workers)
        n_buckets = headers[0][7] if not problems else 0
        self._record(
            "hello", "gather", received=Traffic(metadata=64 * (_HEADER + 2 * n_buckets) * n), outside=True
        )
        self._record("hello ack", "broadcast", sent=Traffic(metadata=128 * n), outside=True)
        refusal = ValueError("parameter server: workers disagree or are malformed: " + "; ".join(problems))
        try:
            self._reply(torch.tensor([MAGIC, 1 if problems else 0], dtype=torch.int64), "hello ack")
        except WorkerLost:
            if problems:  # a malformed peer need not listen; the refusal is the news
                raise refusal from None
            raise
        if problems:
            raise refusal
        hello = Hello.decode(headers[0], layouts[0])
        self.ledger.n_params = sum(bits for _, bits in hello.buckets)
        return hello

    def serve(self) -> int:
        """Run until every worker stops; returns the number of steps served."""
        hello = self._handshake()
        ops = ops_for(self.comm.device)
        while True:
            heads = self._gather((3,), torch.int64, "step header").cpu().tolist()
            if any(h[0] != MAGIC or h[1] not in (OP_STEP, OP_STOP) for h in heads):
                raise ValueError(f"parameter server: malformed step headers {heads}")
            if len({(h[1], h[2]) for h in heads}) != 1:
                raise RuntimeError(f"parameter server: workers are at different steps: {heads}")
            if heads[0][1] == OP_STOP:
                # After the last step: in the totals, not in any step.
                n = len(self.workers)
                self._record("stop", "gather", received=Traffic(metadata=192 * n), outside=True)
                self._record("totals", "broadcast", sent=Traffic(metadata=512 * n), outside=True)
                self._reply(torch.tensor([MAGIC, *self._totals()], dtype=torch.int64), "totals")
                return self.steps_served
            self._serve_step(hello, ops, step=heads[0][2])
            self.steps_served += 1

    def _serve_step(self, hello: Hello, ops: Any, *, step: int) -> None:
        n = len(self.workers)
        self.ledger.begin_step()
        try:
            self._record("step header", "gather", received=Traffic(metadata=192 * n))
            for k, (nbytes, payload) in enumerate(hello.buckets):
                bits = self._gather((nbytes,), torch.uint8, f"bucket{k} bits")
                key = derive_key(hello.seed, TIE_STREAM, step, k)
                planes, _ = ops.combine(bits, vote=hello.vote, tie=hello.tie, tie_key=key)
                assert planes.shape[0] == hello.result_planes, "server and workers disagree on B"
                self._reply(planes.contiguous(), f"bucket{k} result")
                self._record(f"bucket{k}", "gather", received=_full(nbytes, payload) * n)
                self._record(f"bucket{k}", "broadcast", sent=_full(nbytes, payload) * (n * planes.shape[0]))
        finally:
            self.ledger.end_step()

    def _totals(self) -> list[int]:
        sent, received = self.ledger.totals()
        by_kind = [getattr(t, k) for t in (sent, received) for k in ("payload", "padding", "metadata")]
        return [self.ledger.n_steps, *by_kind]

    def _record(
        self,
        name: str,
        op: str,
        *,
        sent: Traffic = NO_TRAFFIC,
        received: Traffic = NO_TRAFFIC,
        outside: bool = False,
    ) -> None:
        rec = CollectiveRecord(f"{name}[server]", op, len(self.workers) + 1, sent, received)
        if outside:
            self.ledger.record_extra(rec)
        else:
            self.ledger.record(rec)
