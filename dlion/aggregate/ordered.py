"""Collectives with a fixed order of additions, so a distributed sum equals a local one bit for bit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dlion.ledger import CollectiveRecord, Ledger, Traffic


def ring_all_gather(chunks: Sequence[Traffic], rank: int) -> tuple[Traffic, Traffic]:
    """Ring all_gather of chunks split differently: a rank forwards every chunk but that of
    the rank after it, and receives every chunk but its own."""
    n = len(chunks)
    sent, received = Traffic(), Traffic()
    for j, chunk in enumerate(chunks):
        sent = sent if j == (rank + 1) % n else sent + chunk
        received = received if j == rank else received + chunk
    return sent, received


def ordered_all_reduce_mean(comm: Any, x: torch.Tensor, ledger: Ledger) -> torch.Tensor:
    """Mean over ranks of fp32[D]: all_to_all of N shards, each rank adds its shard's N rows
    in rank order, all_gather of the sums. The bytes of a ring all_reduce, 2 (N-1)/N S each
    way; unlike Gloo's ring, the order of the additions is fixed, so the result equals a
    single-process sum bit for bit."""
    n, me, d = comm.world_size, comm.rank, x.numel()
    s = -(-d // (4 * n)) * 4  # each shard whole 16-byte words
    buf = torch.zeros(n * s, dtype=torch.float32)
    buf[:d] = x
    rows = comm.all_to_all(buf, "dgc dense all_to_all").cpu()  # [N, s]: every rank's shard `me`
    shard = torch.zeros(s, dtype=torch.float32)
    for r in range(n):
        shard += rows[r]
    full = comm.all_gather(shard, "dgc dense all_gather").cpu().reshape(-1)
    payload = [32 * max(0, min(d, (j + 1) * s) - j * s) for j in range(n)]
    chunks = [Traffic(payload=b, padding=32 * s - b) for b in payload]
    up = sum((c for j, c in enumerate(chunks) if j != me), Traffic())
    ledger.record(CollectiveRecord("dgc.dense", "all_to_all", n, up, chunks[me] * (n - 1)))
    sent, received = ring_all_gather(chunks, me)
    ledger.record(CollectiveRecord("dgc.dense", "all_gather", n, sent, received))
    return full[:d].div_(n)
