"""Transports: the ``Comm`` protocol and its torch.distributed and MPI implementations."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist

from dlion.checks import one_of
from dlion.transport.base import CollectiveTimeout, Comm, Pending, deadline_of
from dlion.transport.torch_comm import TorchComm

TRANSPORTS: tuple[str, ...] = ("torch", "mpi")

__all__ = ["TRANSPORTS", "CollectiveTimeout", "Comm", "Pending", "TorchComm", "deadline_of", "make_comm"]


def make_comm(group: Any, timeout: timedelta | None, transport: str = "torch") -> Comm | None:
    """The transport an optimizer talks through, made once.

    ``group`` may already be a ``Comm`` (handed in: used as it is). Otherwise, for
    "mpi", an MpiComm over ``group`` (an mpi4py communicator; None: COMM_WORLD); for
    "torch", a TorchComm over ``group`` (a process group; None: the default one), or None
    when torch.distributed is not initialised (a single process).
    """
    one_of("transport", transport, TRANSPORTS)
    if isinstance(group, Comm):
        return group
    if transport == "mpi":
        from dlion.transport.mpi_comm import MpiComm  # mpi4py is an extra

        return MpiComm(group, timeout=timeout)
    if dist.is_available() and dist.is_initialized():
        return TorchComm(group, timeout)
    return None
