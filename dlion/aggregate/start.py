"""Ranks start from the same parameters: every rank's tensors are checked against rank 0's (an
all_gather of one CRC per tensor), then either the tensors that differ are made rank 0's by a
broadcast ("broadcast"), or a difference is an error ("verify").

Both run once, after the fingerprint has checked that every rank holds the same shapes. A model
that already starts equal (built from one seed, or wrapped by DDP, which broadcast it) costs the
checksums only; otherwise the broadcast is one message per dtype and device of the tensors that
differ. Both are recorded in the ledger beside the steps (in the byte totals, not in the
per-step bits).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from itertools import groupby

import torch

from dlion.ledger import CollectiveRecord, Ledger, Traffic, all_gather_traffic
from dlion.transport import Comm
from dlion.wire import WORD_BYTES, round_up

START_MODES: tuple[str, ...] = ("broadcast", "verify")


@torch.no_grad()
def broadcast_from_rank0(comm: Comm, tensors: Sequence[torch.Tensor], ledger: Ledger) -> None:
    """Every rank's ``tensors`` become rank 0's, in place."""
    n = comm.world_size
    key = lambda t: (str(t.dtype), str(t.device))  # noqa: E731
    for (dtype, _), same in groupby(sorted(tensors, key=key), key=key):
        group = list(same)
        numel = sum(t.numel() for t in group)
        size = group[0].element_size()
        flat = torch.zeros(
            round_up(numel * size, WORD_BYTES) // size, dtype=group[0].dtype, device=group[0].device
        )
        offset = 0
        for t in group:
            flat[offset : offset + t.numel()].copy_(t.reshape(-1))
            offset += t.numel()
        got = comm.broadcast(flat, 0, f"{dtype} parameters broadcast from rank 0").to(flat.device)
        offset = 0
        for t in group:
            t.copy_(got[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        full = Traffic(payload=8 * size * numel, padding=8 * size * (flat.numel() - numel))
        sent, received = (full * (n - 1), Traffic()) if comm.rank == 0 else (Traffic(), full)
        ledger.record_extra(CollectiveRecord(f"start[{dtype}]", "broadcast", n, sent, received))


def _gather_checksums(comm: Comm, tensors: Sequence[torch.Tensor], ledger: Ledger) -> torch.Tensor:
    """Every rank's CRC of each tensor: int64[N, >= T] (rows padded to whole 16-byte words)."""
    crcs = [
        zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        for t in tensors
    ]
    mine = torch.zeros(max(2, round_up(len(crcs), 2)), dtype=torch.int64)
    mine[: len(crcs)] = torch.tensor(crcs, dtype=torch.int64)
    rows = comm.all_gather(mine, "parameter checksum all_gather").cpu()
    sent, received = all_gather_traffic(Traffic(metadata=64 * mine.numel()), comm.world_size)
    ledger.record_extra(CollectiveRecord("start check", "all_gather", comm.world_size, sent, received))
    return rows


def _differ(rows: torch.Tensor, i: int) -> list[int]:
    """The ranks whose tensor i differs from rank 0's."""
    return [r for r in range(1, rows.shape[0]) if rows[r, i] != rows[0, i]]


def verify_same_as_rank0(
    comm: Comm, tensors: Sequence[torch.Tensor], names: Sequence[str], ledger: Ledger
) -> None:
    """Raise ValueError on every rank, naming the first tensor (and the ranks) that differs
    from rank 0's."""
    rows = _gather_checksums(comm, tensors, ledger)
    for i, name in enumerate(names):
        differ = _differ(rows, i)
        if differ:
            raise ValueError(
                f"ranks start from different parameters: {name} on rank(s) {', '.join(map(str, differ))} "
                "differs from rank 0's. Build the model from the same seed on every rank, or let the "
                "optimizer broadcast rank 0's parameters (start='broadcast')"
            )


def equalize_to_rank0(comm: Comm, tensors: Sequence[torch.Tensor], ledger: Ledger) -> None:
    """Every rank's ``tensors`` become rank 0's: checked by CRC, and only those that differ on
    some rank are broadcast (every rank sees every CRC, so all pick the same ones)."""
    rows = _gather_checksums(comm, tensors, ledger)
    stale = [t for i, t in enumerate(tensors) if _differ(rows, i)]
    if stale:
        broadcast_from_rank0(comm, stale, ledger)


def start_equal(
    comm: Comm, mode: str, tensors: Sequence[torch.Tensor], names: Sequence[str], ledger: Ledger
) -> None:
    """The start, by ``mode`` (CommConfig.start): ``tensors`` made rank 0's where they differ,
    or checked equal on every rank (``names`` say which in the error)."""
    if mode == "broadcast":
        equalize_to_rank0(comm, tensors, ledger)
    else:
        verify_same_as_rank0(comm, tensors, names, ledger)
