"""The cost-model projection's model: each method's collectives per step, and alpha-beta time.

Bytes. A method's step is a list of collectives (``plan``): the list, order and per-rank
bytes that its optimizer's ledger records in a steady step (tests/test_project.py runs the
real optimizers at N = 2..4 and compares record by record). Sizes come from bench.comm.model's
closed forms (``bucket_bytes``, ``result_planes``, ``meta_bytes``, WORD_BYTES), so a step's
sum equals ``bench.comm.model.expected_bytes`` at any N (``check_bytes``). TernGrad and DGC, which
bench.comm.model does not cover, are written out below from their wire formats.

Time. A collective of ``size`` bytes on N ranks, alpha seconds per message start-up, beta
seconds per byte (1 / link bandwidth), links full duplex, L = ceil(log2 N):

| op | ring | tree (log-depth) |
|---|---|---|
| all_reduce, buffer S | 2(N-1) alpha + 2(N-1)/N S beta | recursive doubling: L (alpha + S beta) |
| all_gather, s per rank | (N-1) (alpha + s beta) | recursive doubling, Bruck: L alpha + (N-1) s beta |
| all_to_all, S per rank | pairwise: (N-1) (alpha + S/N beta) | Bruck: L (alpha + S/2 beta) |
| gather / broadcast, s each | flat, as the ledger counts it: fan (alpha + s beta) | (the same) |

``fan`` is the number of messages through the server's link, its bottleneck: N-1 with the
server on rank 0, N for a server process of its own. ``best`` takes, per collective, the
faster of ring and tree, as MPI libraries choose by message size and N: a tree for small
messages or many ranks, a ring for large buffers. The ring all_reduce's bandwidth term tends
to 2 S beta; the tree's grows as L S beta (halving-doubling and NCCL's double binary tree get
the ring's bandwidth term with about 2 L start-ups). Collectives run one after another, as
the optimizers issue them, and nothing overlaps with compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from bench.comm import model as cm
from bench.comm.model import WORD_BYTES, Bytes
from bench.comm.rank import BUCKET_NUMEL, tensor_numels
from dlion.worker.baselines.dgc_config import DGCConfig
from dlion.worker.core.config import Vote

Op = Literal["all_reduce", "all_gather", "all_to_all", "gather", "broadcast"]
Algorithm = Literal["ring", "tree", "best"]
ALGORITHMS: tuple[str, ...] = ("ring", "tree", "best")
DGC_DENSITY = round(1.0 - DGCConfig().sparsity, 12)  # DGC's default 0.1% kept, after warm-up


@dataclass(frozen=True, kw_only=True)
class Method:
    """One row of the projection: an optimizer, its backend, and (fp32) a fixed algorithm."""

    label: str
    family: Literal["fp32", "dlion", "terngrad", "dgc"]
    backend: str = "allgather"
    vote: Vote = "majority"
    dedicated: bool = False  # a parameter-server process of its own (N workers + 1)
    algorithm: Algorithm | None = None  # None: the projection's choice

    @property
    def has_server(self) -> bool:
        return self.backend == "server"

    def variant(self) -> cm.Variant | None:
        """bench.comm.model's variant with the same bytes, where bench.comm.model has one."""
        if self.family not in ("fp32", "dlion"):
            return None
        dlion = self.family == "dlion"
        return cm.Variant(
            label=self.label, optimizer=self.family, backend=self.backend if dlion else "-",
            vote=self.vote if dlion else "-", dedicated=self.dedicated,
        )  # fmt: skip


VOTES: tuple[tuple[str, Vote], ...] = (("mavo", "majority"), ("avg", "average"))  # dlion-mavo, dlion-avg
FP32_RING = Method(label="fp32 all-reduce, ring", family="fp32", algorithm="ring")  # adamw/lion-global
FP32_TREE = Method(label="fp32 all-reduce, tree", family="fp32", algorithm="tree")
METHODS: tuple[Method, ...] = (
    FP32_RING,
    FP32_TREE,
    *(
        Method(
            label=f"dlion-{short} {b}{' process' if ded else ''}", family="dlion", backend=b, vote=vote,
            dedicated=ded,
        )
        for b, ded in (("allgather", False), ("sharded", False), ("server", False), ("server", True))
        for short, vote in VOTES
    ),
    Method(label="terngrad allgather", family="terngrad"),
    Method(label="dgc allgather", family="dgc"),
)  # fmt: skip


BY_LABEL: dict[str, Method] = {m.label: m for m in METHODS}


@dataclass(frozen=True)
class Collective:
    """One collective of a step. ``size``: all_reduce, the buffer; all_gather, one rank's
    chunk; all_to_all, one rank's send buffer (N shards); gather/broadcast, one message."""

    name: str  # the ledger record's name
    op: Op
    size: int
    fan: int = 0  # gather/broadcast: messages through the server's link

    def rank_bytes(self, n: int, *, server: bool = False) -> Bytes:
        """What one rank sends and receives, as the ledger counts it (docs/design.md's table)."""
        s, fan = self.size, self.fan
        each = {
            "all_reduce": 2 * (n - 1) * s // n, "all_gather": (n - 1) * s, "all_to_all": (n - 1) * s // n,
        }  # fmt: skip
        if self.op in each:
            return Bytes(each[self.op], each[self.op])
        if self.op == "gather":
            return Bytes(0, fan * s) if server else Bytes(s, 0)
        return Bytes(fan * s, 0) if server else Bytes(0, s)


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def dgc_message_bytes(numels: Sequence[int], density: float = DGC_DENSITY) -> int:
    """DGC's message, every tensor a compressed matrix: an int32 index and an fp32 value per
    slot, k = ceil(numel * density) slots per tensor (at least 1), whole 16-byte words."""
    slots = sum(min(n, max(1, math.ceil(round(n * density, 6)))) for n in numels)
    return 8 * _round_up(slots, WORD_BYTES // 4)


def terngrad_bytes(numels: Sequence[int]) -> tuple[int, int]:
    """TernGrad's (scalers, codes) chunk per rank: an fp32 scaler per tensor, at least one
    16-byte word; 2-bit codes, each tensor from a byte boundary, whole 16-byte words."""
    scalers = 4 * max(4, _round_up(len(numels), 4))
    return scalers, max(WORD_BYTES, _round_up(sum((n + 3) // 4 for n in numels), WORD_BYTES))


@lru_cache(maxsize=65536)
def _plan(method: Method, n: int, numels: tuple[int, ...], bucket_numel: int) -> tuple[Collective, ...]:
    meta = Collective("meta", "all_gather", cm.meta_bytes(n, len(numels)) // (n - 1))
    if method.family == "fp32":
        return meta, Collective("grads", "all_reduce", 4 * _round_up(sum(numels), n))
    if method.family == "terngrad":
        scalers, codes = terngrad_bytes(numels)
        return meta, Collective("scalers", "all_gather", scalers), Collective("codes", "all_gather", codes)
    if method.family == "dgc":
        return meta, Collective("dgc", "all_gather", dgc_message_bytes(numels))
    planes, fan = cm.result_planes(method.vote, n), n if method.dedicated else n - 1
    steps = [
        meta,
        *([Collective("step header", "gather", cm.STEP_HEADER_BYTES, fan)] if method.dedicated else []),
    ]
    align = WORD_BYTES * n if method.backend == "sharded" else WORD_BYTES
    for k, s in enumerate(cm.bucket_bytes(list(numels), bucket_numel, align)):
        if method.backend == "allgather":
            steps.append(Collective(f"bucket{k}", "all_gather", s))
        elif method.backend == "sharded":
            steps += [
                Collective(f"bucket{k}.shards", "all_to_all", s),
                Collective(f"bucket{k}.result", "all_gather", planes * s // n),
            ]
        else:
            steps += [
                Collective(f"bucket{k}", "gather", s, fan),
                Collective(f"bucket{k}", "broadcast", planes * s, fan),
            ]
    return tuple(steps)


def plan(
    method: Method, n: int, numels: Sequence[int], bucket_numel: int = BUCKET_NUMEL
) -> tuple[Collective, ...]:
    """The collectives of one steady step (no first-step fingerprint) on N >= 2 workers."""
    if n < 2:
        raise ValueError(f"a plan needs N >= 2 workers, got {n}")
    return _plan(method, n, tuple(numels), bucket_numel)


def step_bytes(
    method: Method, n: int, numels: Sequence[int], bucket_numel: int = BUCKET_NUMEL, *, server: bool = False
) -> Bytes:
    """A worker's (or the server's) bytes in one step: its plan's, summed."""
    parts = plan(method, n, numels, bucket_numel)
    if server and method.dedicated:  # a server process takes no part in the workers' metadata exchange
        parts = tuple(c for c in parts if c.name != "meta")
    per = [c.rank_bytes(n, server=server) for c in parts]
    return Bytes(sum(b.sent for b in per), sum(b.received for b in per))


def model_bytes(
    method: Method, n: int, numels: Sequence[int], bucket_numel: int = BUCKET_NUMEL, *, server: bool = False
) -> Bytes | None:
    """bench.comm.model's independent figure for the same step, or None where it has none."""
    variant = method.variant()
    if variant is None:
        return None
    rank = variant.server_rank(n) if server else variant.worker_rank(n)
    return cm.expected_bytes(variant, list(numels), n, bucket_numel, rank=rank)


def check_bytes(numels: Sequence[int], workers: Sequence[int], bucket_numel: int = BUCKET_NUMEL) -> int:
    """Raise unless every plan's bytes equal bench.comm.model's, workers' and servers'; the checks made."""
    checked = 0
    for m in METHODS:
        for n in workers:
            for server in (False, True) if m.has_server else (False,):
                mine, theirs = (
                    step_bytes(m, n, numels, bucket_numel, server=server),
                    model_bytes(m, n, numels, bucket_numel, server=server),
                )
                if theirs is not None and mine != theirs:
                    raise AssertionError(
                        f"{m.label} N={n} server={server}: plan {mine} != comm_model {theirs}"
                    )
                checked += theirs is not None
    return checked


@dataclass(frozen=True)
class Terms:
    """Seconds on message start-ups (alpha) and on bytes through the busiest link (beta)."""

    latency: float
    bandwidth: float

    @property
    def total(self) -> float:
        return self.latency + self.bandwidth


def _terms(op: Op, s: float, n: int, alpha: float, beta: float, algorithm: str, fan: int) -> Terms:
    """(start-ups, bytes through the busiest link) from the table in the module docstring."""
    lg = math.ceil(math.log2(n))
    starts, nbytes = {
        ("all_reduce", "ring"): (2 * (n - 1), 2 * (n - 1) / n * s),
        ("all_gather", "ring"): (n - 1, (n - 1) * s),
        ("all_to_all", "ring"): (n - 1, (n - 1) / n * s),
        ("all_reduce", "tree"): (lg, lg * s),
        ("all_gather", "tree"): (lg, (n - 1) * s),
        ("all_to_all", "tree"): (lg, lg * s / 2),
        ("gather", "flat"): (fan, fan * s),
        ("broadcast", "flat"): (fan, fan * s),
    }[op, algorithm]
    return Terms(starts * alpha, nbytes * beta)


def collective_terms(
    op: Op, nbytes: float, n: int, alpha: float, beta: float, *, algorithm: Algorithm = "ring", fan: int = 0
) -> tuple[Terms, str]:
    """(time terms, the algorithm used) of one collective; "best": the faster of ring and tree."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if op in ("gather", "broadcast"):
        return _terms(op, nbytes, n, alpha, beta, "flat", fan), "flat"
    if algorithm != "best":
        return _terms(op, nbytes, n, alpha, beta, algorithm, fan), algorithm
    ring, tree = (_terms(op, nbytes, n, alpha, beta, a, fan) for a in ("ring", "tree"))
    return (tree, "tree") if tree.total < ring.total else (ring, "ring")


def collective_time(
    op: Op, nbytes: float, n: int, alpha: float, beta: float, *, algorithm: Algorithm = "ring", fan: int = 0
) -> float:
    """Seconds for one collective under the alpha-beta model."""
    return collective_terms(op, nbytes, n, alpha, beta, algorithm=algorithm, fan=fan)[0].total


@dataclass(frozen=True)
class Projection:
    """One method at one N and one bandwidth: projected communication per step."""

    method: str
    n: int
    gbits: float
    alpha_us: float
    latency_ms: float
    bandwidth_ms: float
    worker: Bytes  # per step, sent and received by a worker
    server: Bytes | None  # the server's, for a server backend
    collectives: tuple[tuple[str, str, int, str], ...]  # (ledger name, op, size, algorithm used)

    @property
    def comm_ms(self) -> float:
        return self.latency_ms + self.bandwidth_ms


def project(
    method: Method, n: int, d: int, gbits: float, alpha: float, *, algorithm: Algorithm = "best",
    numels: Sequence[int] | None = None, bucket_numel: int = BUCKET_NUMEL,
) -> Projection:  # fmt: skip
    """Communication per step of ``method`` on N workers, d parameters, links of ``gbits``
    Gbit/s, ``alpha`` seconds per message. ``numels``: the tensors (default: the comm
    benchmark's split of d). The fp32 rows keep their own algorithm."""
    sizes = tensor_numels(d) if numels is None else numels
    beta, algo = 8 / (gbits * 1e9), method.algorithm or algorithm
    steps = plan(method, n, sizes, bucket_numel)
    used = [collective_terms(c.op, c.size, n, alpha, beta, algorithm=algo, fan=c.fan) for c in steps]
    server = step_bytes(method, n, sizes, bucket_numel, server=True) if method.has_server else None
    return Projection(
        method.label, n, gbits, alpha * 1e6, 1e3 * sum(t.latency for t, _ in used),
        1e3 * sum(t.bandwidth for t, _ in used), step_bytes(method, n, sizes, bucket_numel), server,
        tuple((c.name, c.op, c.size, a) for c, (_, a) in zip(steps, used, strict=True)),
    )  # fmt: skip


def find_crossover(points: Sequence[tuple[int, float]], compute_ms: float) -> tuple[int | None, int | None]:
    """points: (N, comm ms), ascending N. (The largest N with every N' <= N within compute,
    None if the first is over; the first N over compute, None if none is)."""
    fits = None
    for n, ms in points:
        if ms > compute_ms:
            return fits, n
        fits = n
    return fits, None


def last_fit(lo: int, hi: int, comm_ms: Callable[[int], float], compute_ms: float) -> int:
    """Bisection between N = lo (fits) and N = hi (does not): the last N that fits, taking
    communication to rise with N in between."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if comm_ms(mid) > compute_ms else (mid, hi)
    return lo
