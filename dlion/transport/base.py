"""What every transport offers: the ``Comm`` protocol, its errors, and posted messages.

A transport moves flat numeric buffers between the ranks of one group; it knows nothing of
what they hold. dlion has two: ``TorchComm`` (torch.distributed: Gloo, NCCL) and
``MpiComm`` (mpi4py). Every wait is bounded: a peer that is gone or stuck turns into a
``CollectiveTimeout`` naming the collective, never a silent hang.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, runtime_checkable

import torch


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the configured timeout, or a peer is gone."""


@dataclass(frozen=True)
class Pending:
    """A posted point-to-point send or receive: ``buf`` is valid once it is waited for."""

    work: Any
    buf: torch.Tensor
    what: str
    peer: int
    expect_bytes: int = -1  # receives: the exact length the message must have
    staging: Any = None  # a transport's receive buffer, when it is not ``buf``


def deadline_of(timeout: timedelta | None) -> float | None:
    """The monotonic time by which a wait under ``timeout`` must end (None: no bound)."""
    return None if timeout is None else time.monotonic() + timeout.total_seconds()


@runtime_checkable
class Comm(Protocol):
    """The ranks of one group, as seen from this rank. ``what`` names the message in errors."""

    rank: int
    world_size: int
    timeout: timedelta | None
    device: torch.device  # where received buffers live (CUDA for NCCL, else the CPU)

    def all_gather(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """send: [L] -> [world_size, L], row r from rank r."""
        ...

    def all_to_all(self, send: torch.Tensor, what: str) -> torch.Tensor:
        """send: [N*s], shard j for rank j -> [N, s], row r = rank r's shard for this rank."""
        ...

    def gather(self, send: torch.Tensor, root: int, what: str) -> torch.Tensor | None:
        """send: [L] -> [world_size, L] on ``root``, None elsewhere."""
        ...

    def broadcast(self, buf: torch.Tensor, root: int, what: str) -> torch.Tensor:
        """Every rank's result is ``root``'s ``buf`` (same shape and dtype everywhere)."""
        ...

    def all_reduce_sum(self, buf: torch.Tensor, what: str) -> None:
        """In-place sum over ranks."""
        ...

    def isend(self, buf: torch.Tensor, dst: int, what: str) -> Pending: ...

    def irecv(self, buf: torch.Tensor, src: int, what: str) -> Pending: ...

    def wait_all(self, pending: Sequence[Pending]) -> None:
        """Wait for all under one deadline; the error names the peer that failed first."""
        ...


def torch_group_of(comm: Comm) -> Any:
    """The torch.distributed group under ``comm``, or None (MPI, threads, a transport of the
    user's own): what needs torch's own collectives (agreeing on the device, DDP's and
    PowerSGD's hooks) reads it. A capability a transport may declare as ``torch_group``; not
    part of the ``Comm`` protocol, so a transport written before it still is a Comm."""
    return getattr(comm, "torch_group", None)
