"""Communication benchmark: bytes and time per optimizer step, Distributed Lion vs fp32 all-reduce.

For each transport (torch.distributed over Gloo, MPI) and each N, one launch of N local
ranks measures every variant of ``bench.comm.model.VARIANTS`` on the same synthetic parameters
(25M by default, in a handful of odd-sized tensors) and the same per-rank seeded
gradients: fp32 ring all-reduce of the gradients (GlobalOptimizer around SGD, whose own
step is nearly free, so its time is the all-reduce's) and DistributedLion with each backend
(allgather, sharded, server on rank 0) and vote (majority, average). Reported per worker:

- bytes sent and received in a steady-state step, from the optimizer's ledger (the first
  step also carries a one-off fingerprint exchange and is not reported), checked to the
  byte against docs/design.md's cost model (``bench.comm.model``), padding and metadata included;
- time per optimizer step: a warm-up step, then the median over ``--steps`` timed steps,
  each after a barrier, of the slowest rank's time. Ranks share this machine's cores, so
  times at large N measure contention as much as the network.

Run ``python -m bench.comm [--sizes 2 4 8 16] [--params 25000000] [--transports torch mpi]
[--steps 3] [--out bench-results/comm]``, or ``--small`` (1M parameters, N = 2 and 4, MPI
at N = 2 only) for CI. Writes comm.json, comm.md (the table) and comm_bytes.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.comm.launch import LaunchError, find_mpiexec, launch
from bench.comm.model import FP32, VARIANTS, Bytes, by_label
from bench.comm.rank import BUCKET_NUMEL, LaunchSpec, tensor_numels
from bench.comm.report import Row, launch_rows, plot, render
from bench.common.memory import memory_shortfall

TRANSPORTS = ("torch", "mpi")
RANK_OVERHEAD_MIB = 450  # interpreter, torch, numba, Gloo/MPI buffers (measured: about 420)
BYTES_PER_PARAM = 22  # parameters, gradients and their copy, momentum or fp32 flat buffer (measured: 21)


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What one benchmark run measures: every variant, at every N, over every transport."""

    sizes: tuple[int, ...] = (2, 4, 8, 16)
    params: int = 25_000_000
    transports: tuple[str, ...] = TRANSPORTS
    steps: int = 3
    out: Path = Path("bench-results/comm")
    timeout_s: float = 1500.0  # per launch, and per collective inside it
    mpi_sizes: tuple[int, ...] | None = None  # MPI only at these N (None: every size)
    variants: tuple[str, ...] = field(default_factory=lambda: tuple(v.label for v in VARIANTS))

    def __post_init__(self) -> None:
        if not self.sizes:
            raise ValueError("--sizes needs at least one N")
        for n in self.sizes:
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise ValueError(f"--sizes: every N must be an int >= 2, got {n!r}")
        if isinstance(self.params, bool) or not isinstance(self.params, int) or self.params < 1:
            raise ValueError(f"--params must be an int >= 1, got {self.params!r}")
        if not self.transports:
            raise ValueError("--transports needs at least one of torch, mpi")
        for t in self.transports:
            if t not in TRANSPORTS:
                raise ValueError(f"--transports: {t!r} is not one of {', '.join(TRANSPORTS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"--steps must be an int >= 1, got {self.steps!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be > 0 seconds, got {self.timeout_s!r}")
        for label in self.variants:
            by_label(label)  # raises naming an unknown variant

    def launches(self) -> list[tuple[str, int]]:
        return [
            (t, n)
            for t in dict.fromkeys(self.transports)
            for n in sorted(set(self.sizes))
            if t != "mpi" or self.mpi_sizes is None or n in self.mpi_sizes
        ]

    def spec(self, transport: str, n: int, *, dedicated: bool = False) -> LaunchSpec | None:
        """The launch of this transport and N: the variants with a server process of their own
        run in a launch of N + 1 ranks apart (None if there are none)."""
        variants = tuple(v for v in self.variants if by_label(v).dedicated == dedicated)
        if not variants:
            return None
        return LaunchSpec(
            transport=transport, world=n + dedicated, params=self.params, steps=self.steps,
            variants=variants, out_dir="", timeout_s=self.timeout_s, bucket_numel=BUCKET_NUMEL,
            dedicated=dedicated,
        )  # fmt: skip


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # launches not run, and why
    failed: list[str] = field(default_factory=list)  # launches that failed, and how
    peak_rss_mib: dict[str, float] = field(default_factory=dict)  # per launch, largest rank


def run(cfg: BenchConfig) -> Outcome:
    """Every launch in turn; a launch that cannot run or fails is reported, the rest go on."""
    out = Outcome()
    mpiexec = find_mpiexec() if "mpi" in cfg.transports else None
    for transport, n in cfg.launches():
        name = f"{transport} N={n}"
        why = "no mpiexec or mpi4py" if transport == "mpi" and mpiexec is None else None
        why = why or memory_shortfall(
            n, cfg.params, overhead_mib=RANK_OVERHEAD_MIB, bytes_per_param=BYTES_PER_PARAM
        )
        if why is not None:
            out.skipped.append(f"{name}: {why}")
            print(f"{name}: skipped, {why}", file=sys.stderr, flush=True)
            continue
        base = None
        for dedicated in (False, True):
            spec = cfg.spec(transport, n, dedicated=dedicated)
            if spec is None:
                continue
            label = f"{name}{' + server process' if dedicated else ''}"
            t0 = time.monotonic()
            try:
                ranks = launch(spec, mpiexec)
            except LaunchError as err:
                out.failed.append(f"{label}: {err}")
                print(f"{label}: FAILED, {err}", file=sys.stderr, flush=True)
                continue
            rows = launch_rows(transport, n, BUCKET_NUMEL, ranks, base)
            fp32 = next((r for r in rows if r.variant == FP32.label), None)
            if fp32 is not None:
                base = (Bytes(fp32.sent, fp32.received), fp32.ms)
            out.rows += rows
            peak = out.peak_rss_mib[label] = max(r["peak_rss_mib"] for r in ranks)
            print(f"{label}: {time.monotonic() - t0:.1f} s, peak RSS per rank {peak:.0f} MiB", flush=True)
    return out


def write_outputs(cfg: BenchConfig, out: Outcome, wall: float) -> str:
    """comm.json, comm.md and comm_bytes.png under ``cfg.out``; returns the table."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    table = render(out.rows)
    numels = tensor_numels(cfg.params)
    report = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "numels": numels,
        "bucket_numel": BUCKET_NUMEL,
        "cpu_count": os.cpu_count(),
        "wall_s": wall,
        **asdict(out),
    }
    (cfg.out / "comm.json").write_text(json.dumps(report, indent=2))
    title = f"# Communication benchmark: {cfg.params:,} parameters, {cfg.steps} timed steps\n\n"
    notes = "".join(f"\n- skipped {s}" for s in out.skipped) + "".join(f"\n- FAILED {s}" for s in out.failed)
    (cfg.out / "comm.md").write_text(title + table + notes + "\n")
    if out.rows and not plot(out.rows, numels, BUCKET_NUMEL, cfg.out / "comm_bytes.png"):
        print("matplotlib is missing: no plot (pip install 'dlion[bench]')", file=sys.stderr)
    return table


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.comm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[2, 4, 8, 16], metavar="N", help="ranks per launch"
    )
    parser.add_argument("--params", type=int, default=25_000_000, help="parameters (default 25,000,000)")
    parser.add_argument(
        "--transports", nargs="+", default=list(TRANSPORTS), metavar="T", help="torch and/or mpi"
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step (default 3)")
    parser.add_argument("--timeout", type=float, default=1500.0, help="seconds per launch (default 1500)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/comm"), help="output folder")
    parser.add_argument("--small", action="store_true", help="CI size: 1M parameters, N=2,4, 2 steps")
    return parser.parse_args(argv), parser


def config_from(args: argparse.Namespace) -> BenchConfig:
    common = {"out": args.out, "timeout_s": args.timeout}
    if args.small:
        return BenchConfig(sizes=(2, 4), params=1_000_000, steps=2, mpi_sizes=(2,), **common)
    return BenchConfig(
        sizes=tuple(args.sizes),
        params=args.params,
        transports=tuple(args.transports),
        steps=args.steps,
        **common,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args, parser = parse_args(argv)
    try:
        cfg = config_from(args)
    except ValueError as err:
        parser.error(str(err))
    t0 = time.monotonic()
    out = run(cfg)
    wall = time.monotonic() - t0
    print(write_outputs(cfg, out, wall))
    print(f"\nwall time {wall:.1f} s; wrote {cfg.out / 'comm.json'}, comm.md, comm_bytes.png")
    ok = bool(out.rows) and not out.failed and all(r.ledger_ok for r in out.rows)
    return 0 if ok else 1
