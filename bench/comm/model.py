"""The communication benchmark's configurations, and docs/design.md's byte cost model for each.

The model is written out in closed form from docs/design.md ("Byte ledger: cost model") and
shares no code with the optimizers' ledger, so that the benchmark's ledger == model check
means something. Per step and per rank, with N ranks, T tensors and P parameters:

- every step starts with a metadata all_gather of 4 + ceil(T/8) bytes per rank:
  (N-1) (4 + ceil(T/8)) bytes each way;
- sign bits live in buckets: each tensor starts on a byte (ceil(numel/8) bytes), tensors
  are grouped in order into buckets of about ``bucket_numel`` elements, and each bucket is
  padded to whole 16-byte words (16 N bytes for "sharded", so every rank's shard is whole
  words). S is the sum of the padded bucket sizes; B the result planes: 1 for majority
  vote (ties broken by a coin), ceil(log2(N+1)) for average;
- allgather: (N-1) S each way; sharded: 2 (N-1)/N S up and down for B = 1, in general
  (N-1)/N S (1 + B); server on rank 0: a worker sends S and receives B S, the server
  receives (N-1) S and sends (N-1) B S; a dedicated server process (rank N of N + 1): a
  worker sends S + a 24-byte step header and receives B S, the server receives N (S + 24)
  and sends N B S, and takes no part in the workers' metadata exchange;
- fp32 ring all-reduce of the gradients, padded to a multiple of N elements:
  2 (N-1)/N * 4 * ceil(P/N) N bytes each way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

WORD_BYTES = 16


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One optimizer configuration measured at every N; add a row to VARIANTS to measure another."""

    label: str
    optimizer: Literal["fp32", "dlion"]
    backend: str = "-"
    vote: str = "-"
    dedicated: bool = False  # a parameter-server process of its own, rank N of N + 1

    @property
    def has_server(self) -> bool:
        """One rank plays the server: its traffic is not a worker's."""
        return self.backend == "server"

    def server_rank(self, n: int) -> int:
        return n if self.dedicated else 0

    def worker_rank(self, n: int) -> int:
        """The rank whose ledger the table shows: a worker, never the server."""
        return 1 if self.has_server and not self.dedicated else 0


FP32 = Variant(label="fp32 all-reduce (SGD)", optimizer="fp32")
VARIANTS: tuple[Variant, ...] = (
    FP32,
    *(
        Variant(label=f"{backend} {vote}", optimizer="dlion", backend=backend, vote=vote)
        for backend in ("allgather", "sharded", "server")
        for vote in ("majority", "average")
    ),
    *(
        Variant(
            label=f"server process {vote}", optimizer="dlion", backend="server", vote=vote, dedicated=True
        )
        for vote in ("majority", "average")
    ),
)
STEP_HEADER_BYTES = 24  # a worker's per-step header to a dedicated server
HEADLINE = "sharded majority"  # the variant the closing note compares with fp32 all-reduce


def by_label(label: str) -> Variant:
    for v in VARIANTS:
        if v.label == label:
            return v
    raise ValueError(f"unknown variant {label!r}; known: {', '.join(v.label for v in VARIANTS)}")


@dataclass(frozen=True)
class Bytes:
    """Bytes one rank sends and receives in one step."""

    sent: int
    received: int

    @property
    def total(self) -> int:
        return self.sent + self.received


def bucket_bytes(numels: list[int], bucket_numel: int, align: int) -> list[int]:
    """Padded size of each bucket of packed sign bits."""
    sizes: list[int] = []
    used, count = 0, 0  # bytes of the open bucket, tensors in it
    for numel in numels:
        if count and 8 * used + numel > bucket_numel:
            sizes.append(used)
            used, count = 0, 0
        used += math.ceil(numel / 8)
        count += 1
    sizes.append(used)
    return [max(align, math.ceil(s / align) * align) for s in sizes]


def result_planes(vote: str, n: int) -> int:
    return 1 if vote == "majority" else math.ceil(math.log2(n + 1))


def meta_bytes(n: int, n_tensors: int) -> int:
    return (n - 1) * (4 + math.ceil(n_tensors / 8))


def expected_bytes(variant: Variant, numels: list[int], n: int, bucket_numel: int, *, rank: int) -> Bytes:
    """What docs/design.md says ``rank`` sends and receives in a steady-state step (no fingerprint)."""
    meta = meta_bytes(n, len(numels))
    if variant.optimizer == "fp32":
        padded = math.ceil(sum(numels) / n) * n
        each = 2 * (n - 1) * 4 * padded // n
        return Bytes(meta + each, meta + each)
    align = WORD_BYTES * n if variant.backend == "sharded" else WORD_BYTES
    buckets = bucket_bytes(numels, bucket_numel, align)
    s, b = sum(buckets), result_planes(variant.vote, n)
    if variant.backend == "allgather":
        up = down = (n - 1) * s
    elif variant.backend == "sharded":
        up = down = sum((n - 1) * size // n * (1 + b) for size in buckets)
    elif variant.dedicated and rank == n:  # the server: no metadata exchange among workers
        return Bytes(n * b * s, n * (s + STEP_HEADER_BYTES))
    elif variant.dedicated:
        up, down = s + STEP_HEADER_BYTES, b * s
    elif variant.backend == "server" and rank == 0:
        up, down = (n - 1) * b * s, (n - 1) * s
    elif variant.backend == "server":
        up, down = s, b * s
    else:
        raise ValueError(f"no cost model for backend {variant.backend!r}")
    return Bytes(meta + up, meta + down)
