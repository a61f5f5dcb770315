"""A dedicated parameter server: a process of its own that trains nothing.

Workers are ranks 0..N-1 of the job and the server is rank N; the messages are in
``protocol.py``. The server receives N S and sends N B S per bucket (docs/design.md's
gather to a server and flat broadcast), recorded in its own ledger. When every worker
sends op STOP (``DistributedLion.close()``) the loop ends cleanly; a worker that dies or
goes silent is a ``WorkerLost`` naming its rank within the timeout.
"""

from __future__ import annotations

from typing import Any

import torch

from dlion.compress.sign_ops import ops_for
from dlion.ledger import NO_TRAFFIC, CollectiveRecord, Ledger, Traffic
from dlion.server.client import ServerLink
from dlion.server.protocol import HEADER_WORDS, MAGIC, OP_STEP, OP_STOP, Hello, full_traffic, header_error
from dlion.transport import CollectiveTimeout, Pending
from dlion.wire import TIE_STREAM, derive_key


class WorkerLost(CollectiveTimeout):
    """A worker died or went silent while the parameter server waited for it."""


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
        headers = self._gather((HEADER_WORDS,), torch.int64, "hello").cpu().tolist()
        bad = {r: e for r, h in enumerate(headers) if (e := header_error(h))}
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
            "hello",
            "gather",
            received=Traffic(metadata=64 * (HEADER_WORDS + 2 * n_buckets) * n),
            outside=True,
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
                self._record(f"bucket{k}", "gather", received=full_traffic(nbytes, payload) * n)
                self._record(
                    f"bucket{k}", "broadcast", sent=full_traffic(nbytes, payload) * (n * planes.shape[0])
                )
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
