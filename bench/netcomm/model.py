"""The emulated-cluster benchmark's cases, its synthetic parameter shapes, and each case's bytes.

A case is one optimizer on one backend. The expected bytes of a steady-state step come
from closed forms written from docs/design.md and each optimizer's documented wire format,
sharing no code with the ledgers they are checked against: Distributed Lion (and Signum,
the same wire) and fp32 all-reduce (AdamW) through ``bench.comm.model``; TernGrad and DGC here.
With N ranks and T tensors, every optimizer's step starts with the metadata all_gather of
4 + ceil(T/8) bytes per rank, (N-1) times that each way; then:

- TernGrad: all_gather of the T fp32 scalers (at least 4, whole 16-byte words); one packet
  of 2-bit codes, each tensor on a byte, padded to whole 16-byte words (P bytes).
  allgather: (N-1) P each way. server (rank 0): a worker sends P and receives
  ceil(log2(2N+1)) bit planes of ceil(4P/8) bytes each, rounded up to 16-byte words.
- DGC at its final density 0.1% (no warm-up): k = ceil(numel/1000) slots per matrix,
  S = their sum rounded up to 4; a message of S int32 indices and S fp32 values. Vectors
  travel dense. allgather: (N-1) messages each way, and the vectors' fp32 all-reduce in
  rank order (all_to_all + all_gather of N shards of whole 16-byte words). server: the
  vectors ride in the message (rounded up to 4 floats); a worker sends it and receives the
  dense fp32 average of every parameter, padded to 4 floats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.comm.model import FP32, Bytes, Variant, expected_bytes, meta_bytes

BUCKET_NUMEL = 1 << 25  # DistributedLion's default, which the registry keeps
WIDTH = 1023  # odd row length: no row fills whole bytes of sign or ternary codes
_FRACTIONS = (0.41, 0.27, 0.17, 0.15)  # of the parameters, in matrices; vectors take the rest
_BIAS = 1021  # the first vector's length when the rest allows two
MIN_PARAMS = 8 * WIDTH  # below this, the matrices would have no rows
DGC_DENSITY = 0.001  # DGC's final density (99.9% sparsity), measured without its warm-up


@dataclass(frozen=True)
class Case:
    """One optimizer on one backend (None: the optimizer has no backend choice)."""

    optimizer: str
    backend: str | None = None

    @property
    def label(self) -> str:
        return self.optimizer if self.backend is None else f"{self.optimizer} {self.backend}"

    @property
    def server_rank(self) -> int | None:
        """The rank that plays the parameter server, whose traffic is not a worker's."""
        return 0 if self.backend == "server" else None

    @property
    def worker_rank(self) -> int:
        return 1 if self.server_rank == 0 else 0


BASELINE = Case("adamw-global")
HEADLINE = Case("dlion-mavo", "sharded")
CASES: tuple[Case, ...] = (
    BASELINE,
    *(Case(o, b) for o in ("dlion-mavo", "dlion-avg") for b in ("allgather", "sharded", "server")),
    Case("signum-mavo", "sharded"),
    *(Case(o, b) for o in ("terngrad", "dgc") for b in ("allgather", "server")),
)


def case_by_label(label: str) -> Case:
    for case in CASES:
        if case.label == label:
            return case
    raise ValueError(f"unknown case {label!r}; known: {', '.join(c.label for c in CASES)}")


def tensor_shapes(total: int) -> list[tuple[int, ...]]:
    """Four matrices of odd shapes, then one or two vectors (biases), exactly ``total`` elements.

    Matrices because DGC compresses only tensors of 2+ dimensions; the vectors are the
    small remainder (under 1% of the parameters from 1M up) that DGC sends dense.
    """
    if isinstance(total, bool) or not isinstance(total, int) or total < MIN_PARAMS:
        raise ValueError(f"a model size must be an int >= {MIN_PARAMS:,}, got {total!r}")
    shapes: list[tuple[int, ...]] = []
    for f in _FRACTIONS:
        rows = int(total * f) // WIDTH
        shapes.append(((rows - 1) | 1, WIDTH))  # odd, and never above the fraction
    left = total - sum(r * c for r, c in shapes)
    return [*shapes, *([(_BIAS,), (left - _BIAS,)] if left > 2 * _BIAS else [(left,)])]


def numels(shapes: list[tuple[int, ...]]) -> list[int]:
    return [math.prod(s) for s in shapes]


def expected(case: Case, shapes: list[tuple[int, ...]], n: int, *, rank: int) -> Bytes:
    """What ``rank`` of ``n`` sends and receives in a steady-state step of ``case``."""
    sizes = numels(shapes)
    if case == BASELINE:
        return expected_bytes(FP32, sizes, n, BUCKET_NUMEL, rank=rank)
    if case.optimizer in ("dlion-mavo", "dlion-avg", "signum-mavo"):
        vote = "average" if case.optimizer == "dlion-avg" else "majority"
        variant = Variant(label=case.label, optimizer="dlion", backend=str(case.backend), vote=vote)
        return expected_bytes(variant, sizes, n, BUCKET_NUMEL, rank=rank)
    meta = meta_bytes(n, len(sizes))
    if case.optimizer == "terngrad":
        up, down = _terngrad(case, sizes, n, rank)
    elif case.optimizer == "dgc":
        up, down = _dgc(case, shapes, n, rank)
    else:
        raise ValueError(f"no cost model for {case.label!r}")
    return Bytes(meta + up, meta + down)


def _words(nbytes: int) -> int:
    return -(-nbytes // 16) * 16


def _terngrad(case: Case, sizes: list[int], n: int, rank: int) -> tuple[int, int]:
    scalers = (n - 1) * 4 * max(4, -(-len(sizes) // 4) * 4)
    packet = max(16, _words(sum(-(-s // 4) for s in sizes)))
    planes = math.ceil(math.log2(2 * n + 1)) * _words(4 * packet // 8)
    if case.backend == "allgather":
        return scalers + (n - 1) * packet, scalers + (n - 1) * packet
    if rank == 0:  # the server
        return scalers + (n - 1) * planes, scalers + (n - 1) * packet
    return scalers + packet, scalers + planes


def _dgc(case: Case, shapes: list[tuple[int, ...]], n: int, rank: int) -> tuple[int, int]:
    sizes = numels(shapes)
    slots = sum(
        max(1, math.ceil(round(s * DGC_DENSITY, 6)))
        for s, sh in zip(sizes, shapes, strict=True)
        if len(sh) > 1
    )
    slots = -(-slots // 4) * 4
    dense = sum(s for s, sh in zip(sizes, shapes, strict=True) if len(sh) == 1)
    if case.backend == "allgather":
        shard = -(-dense // (4 * n)) * 4 * 4  # bytes of one rank's shard of the vectors
        each = (n - 1) * 8 * slots + (2 * (n - 1) * shard if dense else 0)
        return each, each
    message = 8 * slots + 4 * (-(-dense // 4) * 4)
    average = 4 * (-(-sum(sizes) // 4) * 4)
    if rank == 0:  # the server
        return (n - 1) * average, (n - 1) * message
    return message, average
