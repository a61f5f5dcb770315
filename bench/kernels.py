"""Throughput of the Numba sign kernels against memcpy and NumPy baselines.

Run ``python -m bench.kernels [--log2n 26] [--repeat 5] [--json PATH]``. Every timing is
the best of ``repeat`` calls after one warm-up call, so Numba's compile time is excluded.
Memory-bound rows are judged against memcpy's bandwidth on the same machine: an operation
that must touch B bytes can at best take B / (memcpy bytes per second).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import numba
import numpy as np

from dlion.kernels import (
    apply_update,
    count_planes,
    lion_sign_step,
    majority_vote,
    pack_signs,
    unpack_signs,
)
from dlion.wire import derive_key

PACK_TARGET = 0.9  # memcpy time / pack_signs time
FUSED_TARGET = 0.7  # memory-bound limit / lion_sign_step time
VOTE_TARGET = 4.0  # NumPy unpack-sum-pack time / majority_vote time, N = 8


@dataclass
class Row:
    """One line of the table: ``ratio`` is described by ``meaning``; no target means informative."""

    name: str
    ms: float
    bytes_touched: int
    ratio: float | None = None
    meaning: str = ""
    target: float | None = None

    @property
    def gbps(self) -> float:
        return self.bytes_touched / (self.ms * 1e-3) / 1e9

    @property
    def status(self) -> str:
        if self.target is None or self.ratio is None:
            return "-"
        return "PASS" if self.ratio >= self.target else "MISS"


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls, in ms, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best * 1e3, 1e-6)


class Bench:
    """Holds the inputs (2^log2n float32 elements) and the memcpy reference time."""

    def __init__(self, log2n: int, repeat: int) -> None:
        self.n = 1 << log2n
        self.repeat = repeat
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal(self.n, dtype=np.float32)
        self.y = np.empty_like(self.x)
        self.m = rng.standard_normal(self.n, dtype=np.float32)
        self.bits = pack_signs(self.x)
        self.memcpy_ms = self.time(lambda: np.copyto(self.y, self.x))

    def time(self, fn: Callable[[], object]) -> float:
        return best_ms(fn, self.repeat)

    @property
    def memcpy_bytes(self) -> int:
        return 8 * self.n

    def limit_ms(self, bytes_touched: int) -> float:
        """The time memcpy's bandwidth needs to move ``bytes_touched``."""
        return bytes_touched / self.memcpy_bytes * self.memcpy_ms

    def bound_row(self, name: str, ms: float, nbytes: int, target: float | None = None) -> Row:
        return Row(name, ms, nbytes, self.limit_ms(nbytes) / ms, "limit/t", target)

    def planes(self, n_workers: int) -> np.ndarray:
        rng = np.random.default_rng(n_workers)
        return rng.integers(0, 256, size=(n_workers, self.n // 8), dtype=np.uint8)


def bench_pack(b: Bench) -> list[Row]:
    nbits = b.n // 8
    memcpy = Row("memcpy np.copyto (float32)", b.memcpy_ms, b.memcpy_bytes, 1.0, "memcpy/t")
    ms_np = b.time(lambda: np.packbits(b.x > 0))
    numpy_row = Row("numpy packbits(x > 0)", ms_np, 4 * b.n + nbits, b.memcpy_ms / ms_np, "memcpy/t")
    ms = b.time(lambda: pack_signs(b.x))
    pack = Row("pack_signs", ms, 4 * b.n + nbits, b.memcpy_ms / ms, "memcpy/t", PACK_TARGET)
    unpack = b.bound_row("unpack_signs", b.time(lambda: unpack_signs(b.bits, b.n)), nbits + 4 * b.n)
    small = b.x[:1024]
    overhead = Row("pack_signs n=1024 (call overhead)", b.time(lambda: pack_signs(small)), 4 * 1024 + 128)
    return [memcpy, numpy_row, pack, unpack, overhead]


def bench_fused(b: Bench) -> list[Row]:
    key = np.uint64(derive_key(1, 2, 3))
    ms = b.time(lambda: lion_sign_step(b.x, b.m, b.bits, 0.9, 0.99, key))
    return [b.bound_row("lion_sign_step (fused)", ms, 12 * b.n + b.n // 8, FUSED_TARGET)]


def numpy_vote(packed: np.ndarray) -> np.ndarray:
    return np.packbits(np.unpackbits(packed, axis=1).sum(0) * 2 > packed.shape[0])


def bench_votes(b: Bench) -> list[Row]:
    rows = []
    for n_workers in (4, 8):
        packed = b.planes(n_workers)
        moved = packed.nbytes + 2 * packed.shape[1]
        ms_np = b.time(partial(numpy_vote, packed))
        ms = b.time(partial(majority_vote, packed))
        target = VOTE_TARGET if n_workers == 8 else None
        rows.append(Row(f"numpy unpack-sum-pack N={n_workers}", ms_np, moved))
        rows.append(Row(f"majority_vote N={n_workers}", ms, moved, ms_np / ms, "numpy/t", target))
    return rows


def bench_extras(b: Bench) -> list[Row]:
    packed = b.planes(8)
    ms = b.time(lambda: count_planes(packed))
    counts = b.bound_row("count_planes N=8", ms, packed.nbytes + 4 * packed.shape[1])
    plane = b.bits[None, :]
    table = np.array([-1.0, 1.0], np.float32)
    ms = b.time(lambda: apply_update(b.y, plane, table, 1e-4, 0.0))
    update = b.bound_row("apply_update (1 plane)", ms, 8 * b.n + b.n // 8)
    return [counts, update]


def run(log2n: int, repeat: int) -> tuple[Bench, list[Row]]:
    b = Bench(log2n, repeat)
    rows = bench_pack(b) + bench_fused(b) + bench_votes(b) + bench_extras(b)
    return b, rows


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(b: Bench, rows: Sequence[Row]) -> str:
    head = f"{'operation':<34} {'time ms':>9} {'GB/s':>7} {'ratio':>7} {'(of)':<9} {'target':>7}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        target = "-" if r.target is None else f">={r.target:g}"
        lines.append(
            f"{r.name:<34} {r.ms:>9.2f} {r.gbps:>7.2f} {fmt(r.ratio, '.2f'):>7} {r.meaning:<9} "
            f"{target:>7}  {r.status}"
        )
    lines.append(
        "ratio kinds: memcpy/t = t_memcpy / t; limit/t = (bytes touched / memcpy bandwidth) / t; "
        "numpy/t = speedup over the NumPy baseline"
    )
    return "\n".join(lines)


def environment(b: Bench) -> dict[str, object]:
    return {
        "n": b.n,
        "repeat": b.repeat,
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": threading_layer(),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "memcpy_gbps": b.memcpy_bytes / (b.memcpy_ms * 1e-3) / 1e9,
    }


def threading_layer() -> str:
    """The layer Numba chose (known only after a parallel kernel has run)."""
    try:
        return str(numba.threading_layer())
    except ValueError:
        return str(getattr(numba.config, "THREADING_LAYER", "default"))


def to_json(b: Bench, rows: Sequence[Row]) -> dict[str, object]:
    out_rows = [{**asdict(r), "gbps": r.gbps, "status": r.status} for r in rows]
    return {**environment(b), "rows": out_rows}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__)
    parser.add_argument("--log2n", type=int, default=26, help="elements = 2**log2n float32 (default 26)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per row, best kept (default 5)")
    parser.add_argument("--json", metavar="PATH", help="also write every number as JSON here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    b, rows = run(args.log2n, args.repeat)
    env = environment(b)
    print(
        f"n = 2^{args.log2n} = {b.n} float32 ({4 * b.n / 2**20:.0f} MiB), best of {b.repeat}; "
        f"numba threads {env['numba_threads']} ({env['numba_threading_layer']} layer), "
        f"OMP_WAIT_POLICY {env['omp_wait_policy']}, cpu count {env['cpu_count']}; "
        f"memcpy {env['memcpy_gbps']:.2f} GB/s (read + write)"
    )
    print(render(b, rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(to_json(b, rows), fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
