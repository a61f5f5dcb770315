"""Transport over torch.distributed (Gloo for CPU tensors, NCCL for CUDA tensors).

Every wait is bounded: collectives run with ``async_op=True`` and ``Work.wait(timeout)``,
so a rank that disappears turns into a CollectiveTimeout naming the collective, never a
silent hang.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the configured timeout."""


class TorchComm:
    """The ranks of one process group, as seen from this rank."""

    def __init__(self, group: dist.ProcessGroup | None = None, timeout: timedelta | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("TorchComm needs torch.distributed to be initialised")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timeout
        # NCCL moves only CUDA tensors; Gloo takes CPU tensors (and stages CUDA ones).
        backend = dist.get_backend(group)
        self.device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )

    def _wait(self, work: dist.Work | None, what: str) -> None:
        if work is None:
            return
        try:
            ok = work.wait(self.timeout) if self.timeout is not None else work.wait()
        except RuntimeError as err:
            raise CollectiveTimeout(
                f"rank {self.rank}/{self.world_size}: {what} failed or timed out "
                f"(timeout {self.timeout}): another rank may have died or diverged: {err}"
            ) from err
        if ok is False:
            raise CollectiveTimeout(f"rank {self.rank}: {what} did not complete within {self.timeout}")

    def all_gather(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """send: [L] -> [world_size, L] on the transport's device, row r from rank r."""
        send = send.to(self.device).contiguous()
        out = torch.empty((self.world_size, *send.shape), dtype=send.dtype, device=self.device)
        work = dist.all_gather_single(out.view(-1), send, group=self.group, async_op=True)
        self._wait(work, what)
        return out

    def all_to_all(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """send: [N*s], shard j for rank j -> [N, s], row r = rank r's shard for this rank."""
        send = send.to(self.device).contiguous()
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
        send = send.to(self.device).contiguous()
        out = None
        parts = None
        if self.rank == root:
            out = torch.empty((self.world_size, *send.shape), dtype=send.dtype, device=self.device)
            parts = list(out.unbind(0))
        work = dist.gather(send, parts, dst=root, group=self.group, async_op=True)
        self._wait(work, what)
        return out

    def broadcast(self, buf: torch.Tensor, root: int, what: str) -> torch.Tensor:
        """In place: every rank's ``buf`` ends as ``root``'s (same shape and dtype everywhere)."""
        buf = buf.to(self.device).contiguous()
        work = dist.broadcast(buf, src=root, group=self.group, async_op=True)
        self._wait(work, what)
        return buf

    def all_reduce_sum(self, buf: torch.Tensor, what: str) -> None:
        """In-place sum over ranks."""
        work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        self._wait(work, what)


def world_comm(group: dist.ProcessGroup | None, timeout: timedelta | None, transport: str = "torch") -> Any:
    """The transport: MpiComm for "mpi"; for "torch", TorchComm over ``group``, or None
    when torch.distributed is not initialised (a single process)."""
    if transport == "mpi":
        from dlion.server.mpi_comm import MpiComm

        return MpiComm(timeout=timeout)
    if dist.is_available() and dist.is_initialized():
        return TorchComm(group, timeout)
    return None
