"""Transport over torch.distributed (Gloo for CPU tensors, NCCL for CUDA tensors).

Every wait is bounded: collectives run with ``async_op=True`` and ``Work.wait(timeout)``,
so a rank that disappears turns into a CollectiveTimeout naming the collective and, by a
roll call (dlion.transport.liveness), the ranks that are gone; never a silent hang.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dlion.transport.base import CollectiveTimeout, Pending, deadline_of
from dlion.transport.liveness import absent_text, roll_call

# torch 2.13 renamed all_gather_into_tensor; the older name serves torch 2.4 to 2.12.
_ALL_GATHER_SINGLE = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
# How many finished collectives a comm keeps alive (see TorchComm._wait).
RETAINED_WORKS = 16


class TorchComm:
    """The ranks of one process group, as seen from this rank."""

    def __init__(self, group: dist.ProcessGroup | None = None, timeout: timedelta | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchComm needs torch.distributed to be initialised")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timeout
        self._pool: ThreadPoolExecutor | None = None
        self._retained: deque[dist.Work] = deque(maxlen=RETAINED_WORKS)
        # NCCL moves only CUDA tensors; Gloo takes CPU tensors (and stages CUDA ones).
        backend = dist.get_backend(group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )

    @property
    def torch_group(self) -> Any:
        """The torch.distributed group (the default group's handle when made with None)."""
        return self.group if self.group is not None else dist.group.WORLD

    def _wait(self, work: dist.Work | None, what: str, deadline: float | None = None) -> None:
        if work is None:
            return
        # Gloo's worker thread drops its reference to a work just after finishing it. If that
        # is the last one, the work dies on that thread and decrefs the Python tensors it
        # holds, which needs the GIL: at interpreter exit, a thread that asks for the GIL is
        # ended mid-destructor, and the process aborts ("terminate called without an active
        # exception"). Keeping the last works here makes the main thread their last owner.
        self._retained.append(work)
        if deadline is None:
            deadline = deadline_of(self.timeout)
        try:
            if self.device.type == "cuda":
                # NCCL: the wait only orders the current stream after the collective, so
                # the host runs ahead; the process group's timeout bounds it (NCCL's
                # watchdog aborts a collective that outlives it).
                work.wait()
                return
            if deadline is None:
                ok = work.wait()
            else:
                ok = work.wait(timedelta(seconds=max(1e-3, deadline - time.monotonic())))
        except RuntimeError as err:
            raise CollectiveTimeout(
                f"rank {self.rank}/{self.world_size}: {what} failed or timed out "
                f"(timeout {self.timeout}); {self._who_is_gone()}: {err}"
            ) from err
        if ok is False:
            raise CollectiveTimeout(
                f"rank {self.rank}: {what} did not complete within {self.timeout}; {self._who_is_gone()}"
            )

    def on_wire(self, t: torch.Tensor) -> torch.Tensor:
        """t, contiguous, on this transport's device. Gloo given a CUDA tensor stages it in
        pinned host memory: one device-to-host copy, which the collective waits for anyway."""
        if t.device == self.device:
            return t.contiguous()
        if t.is_cuda and self.device.type == "cpu":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
            return host
        return t.to(self.device).contiguous()

    def _who_is_gone(self) -> str:
        return absent_text(roll_call(self.group, self.world_size))

    def all_gather(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """send: [L] -> [world_size, L] on the transport's device, row r from rank r."""
        send = self.on_wire(send)
        out = torch.empty((self.world_size, *send.shape), dtype=send.dtype, device=self.device)
        work = _ALL_GATHER_SINGLE(out.view(-1), send, group=self.group, async_op=True)
        self._wait(work, what)
        return out

    def all_to_all(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """send: [N*s], shard j for rank j -> [N, s], row r = rank r's shard for this rank."""
        send = self.on_wire(send)
        if send.numel() % self.world_size:
            raise ValueError(f"{what}: {send.numel()} elements do not split into {self.world_size} shards")
        out = torch.empty(
            (self.world_size, send.numel() // self.world_size), dtype=send.dtype, device=self.device
        )
        work = dist.all_to_all_single(out.view(-1), send, group=self.group, async_op=True)
        self._wait(work, what)
        return out

    def gather(self, send: torch.Tensor, root: int, what: str) -> torch.Tensor | None:
        """send: [L] -> [world_size, L] on ``root``, None elsewhere."""
        send = self.on_wire(send)
        out = None
        parts = None
        if self.rank == root:
            out = torch.empty((self.world_size, *send.shape), dtype=send.dtype, device=self.device)
            parts = list(out.unbind(0))
        work = dist.gather(send, parts, group=self.group, group_dst=root, async_op=True)
        self._wait(work, what)
        return out

    def broadcast(self, buf: torch.Tensor, root: int, what: str) -> torch.Tensor:
        """In place: every rank's ``buf`` ends as ``root``'s (same shape and dtype everywhere)."""
        buf = self.on_wire(buf)
        work = dist.broadcast(buf, group=self.group, group_src=root, async_op=True)
        self._wait(work, what)
        return buf

    def all_reduce_sum(self, buf: torch.Tensor, what: str) -> None:
        """In-place sum over ranks."""
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._wait(work, what)

    def isend(self, buf: torch.Tensor, dst: int, what: str) -> Pending:
        buf = self.on_wire(buf)
        with self._posting(dst, what):
            return Pending(dist.isend(buf, group=self.group, group_dst=dst), buf, what, dst)

    def irecv(self, buf: torch.Tensor, src: int, what: str) -> Pending:
        """Receive into ``buf`` (contiguous, on this transport's device); Gloo checks the length."""
        with self._posting(src, what):
            return Pending(dist.irecv(buf, group=self.group, group_src=src), buf, what, src)

    @contextmanager
    def _posting(self, peer: int, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:  # the connection to the peer is already gone
            raise CollectiveTimeout(f"rank {self.rank}: {what} failed: rank {peer} is gone: {err}") from err

    def wait_all(self, pending: Sequence[Pending]) -> None:
        """Wait for all under one deadline; the error names the peer that failed first.

        Gloo's point-to-point work cannot be polled (is_completed stays False), so the
        waits run side by side in threads: when one peer dies, the others may fail soon
        after as a consequence, and only the order in time tells the cause.
        """
        if len(pending) == 1:
            self._wait(pending[0].work, pending[0].what)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(thread_name_prefix="dlion-p2p")
        deadline = deadline_of(self.timeout)
        futures = {self._pool.submit(self._wait, p.work, p.what, deadline): p for p in pending}
        left = None if deadline is None else max(0.0, deadline - time.monotonic()) + 1.0
        done, not_done = wait(futures, timeout=left, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
        if not_done:
            missing = ", ".join(futures[f].what for f in not_done)
            raise CollectiveTimeout(f"rank {self.rank}: no {missing} within {self.timeout}")
