"""A parameter server co-located on one rank: gather every rank's message there, combine, and
broadcast the result. One round for every payload (sign bits, TernGrad's codes, DGC's sparse
messages), so the ledger reads the same for all of them.

Ledger, per round: a worker records its message up (the gather) and the reply down (the
broadcast) under the payload's names. The server's records are named ``<name>[server]`` so its
traffic reads apart: it receives every other rank's message (its own does not cross the wire)
and sends the reply N-1 times (a flat broadcast).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from dlion.checks import check_int
from dlion.ledger import CollectiveRecord, Ledger, Traffic
from dlion.transport import Comm

T = TypeVar("T")
# Messages [m, L] -> the traffic of each, for payloads whose wire length varies (DGC).
Uplink = Callable[[torch.Tensor], list[Traffic]]


@dataclass(frozen=True, kw_only=True)
class RootRound:
    """One gather -> combine -> broadcast: what its messages are called and what they carry."""

    up_name: str  # the ledger's name of the gather; the server's record is "<up_name>[server]"
    down_name: str  # the ledger's name of the broadcast
    gather_what: str  # the transport's names of the two messages (in its errors)
    broadcast_what: str
    up: Traffic | Uplink  # one worker's message on the wire, or each message's (variable length)
    down: Traffic  # the reply, as one worker receives it
    # Workers size the reply before it arrives: no length on the wire.
    reply_shape: tuple[int, ...]
    reply_dtype: torch.dtype
    root: int = 0

    def __post_init__(self) -> None:
        check_int("root", self.root, low=0, expected="a rank (an int >= 0)")

    def sent_by(self, message: torch.Tensor) -> Traffic:
        """What one worker's ``message`` [L] puts on the wire."""
        return self.up if isinstance(self.up, Traffic) else self.up(message[None])[0]

    def received_at_root(self, gathered: torch.Tensor) -> Traffic:
        """What the server receives of ``gathered`` [N, L]: every row but its own."""
        if isinstance(self.up, Traffic):
            return self.up * (gathered.shape[0] - 1)
        return sum((t for r, t in enumerate(self.up(gathered)) if r != self.root), Traffic())


def exchange_at_root(
    comm: Comm,
    send: torch.Tensor,
    plan: RootRound,
    combine: Callable[[torch.Tensor], tuple[torch.Tensor, T]],
    ledger: Ledger,
) -> tuple[torch.Tensor, T | None]:
    """``send`` [L] from every rank -> (the server's reply on every rank, on ``send``'s device;
    what ``combine`` kept beside it, on the server only, None elsewhere).

    ``combine(gathered [N, L]) -> (reply, kept)`` runs on the server alone; the reply must
    have ``plan.reply_shape`` and ``plan.reply_dtype``, which the workers receive into.
    """
    n, me, root = comm.world_size, comm.rank, plan.root
    if root >= n:
        raise ValueError(f"{plan.up_name}: root must be a rank below the world size {n}, got {root}")
    gathered = comm.gather(send, root, plan.gather_what)
    kept: T | None = None
    if me == root:
        assert gathered is not None
        gathered = gathered.to(send.device)
        reply, kept = combine(gathered)
        if tuple(reply.shape) != plan.reply_shape or reply.dtype != plan.reply_dtype:
            raise RuntimeError(
                f"{plan.up_name}: the server's reply is {tuple(reply.shape)} {reply.dtype}, workers "
                f"expect {plan.reply_shape} {plan.reply_dtype}"
            )
        up = plan.received_at_root(gathered)
        ledger.record(CollectiveRecord(f"{plan.up_name}[server]", "gather", n, Traffic(), up))
    else:
        reply = torch.empty(plan.reply_shape, dtype=plan.reply_dtype, device=send.device)
        ledger.record(CollectiveRecord(plan.up_name, "gather", n, plan.sent_by(send), Traffic()))
    reply = comm.broadcast(reply, root, plan.broadcast_what).to(send.device)
    if me == root:
        ledger.record(
            CollectiveRecord(f"{plan.down_name}[server]", "broadcast", n, plan.down * (n - 1), Traffic())
        )
    else:
        ledger.record(CollectiveRecord(plan.down_name, "broadcast", n, Traffic(), plan.down))
    return reply, kept
