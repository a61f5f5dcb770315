"""Communication benchmark on an emulated cluster: time and bytes per optimizer step, per optimizer.

    python -m bench.netcomm [--small] [--rates 1gbit,10gbit] [--sizes 1e6,25e6,100e6]
                                  [--hosts 4] [--steps 5] [--out bench-results/netcomm]

For each rate, one launch on H emulated hosts (``launch.cluster.run_on_hosts``:
a network namespace each, links shaped to the rate both ways, one process per host) runs
``bench.netcomm.rank`` on every host. It measures every case of
``bench.netcomm.model.CASES`` (Distributed Lion's majority and average votes on every backend,
Signum, AdamW with fp32 all-reduce, TernGrad and DGC on theirs) at every model size, with
synthetic parameters and seeded gradients, so no compute but the optimizer's is timed.

Reported per case, size and rate: the median over timed steps of the slowest rank's step
time, and its speed-up over adamw-global; a worker's ledger bytes per step, checked to the
byte against the cost model (``bench.netcomm.model``) on every rank; the worker's host's eth0
bytes over the timed steps beside them; and, per launch, every host's interface bytes
beside all of its ledger's. Writes netcomm.json, netcomm.md and netcomm.png to ``--out``.

``--small`` (CI and first runs, about a minute): 4 hosts at 1gbit, 100k and 1M parameters,
1 warm-up and 2 timed steps. The full run (the README's numbers): 1gbit and 10gbit,
1M, 25M and 100M parameters. Needs Linux and root (network namespaces).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common.memory import memory_shortfall
from bench.netcomm.model import CASES, case_by_label, tensor_shapes
from bench.netcomm.rank import RankSpec
from bench.netcomm.report import (
    Row,
    bytes_table,
    detail_table,
    headlines,
    host_totals,
    launch_rows,
    plot,
    time_table,
)
from launch.cluster import HostJob, run_on_hosts
from launch.netns import NetSpec, namespaces_unavailable

RANK_OVERHEAD_MIB = 500  # interpreter, torch, numba, Gloo buffers
BYTES_PER_PARAM = 36  # params, seeded grads, .grad, the largest state (DGC, AdamW); measured 35.6 at 100M
DETAILS = (
    "The worker host's eth0 bytes per timed step beside its ledger's (headers, ACKs and the "
    "barriers included). Where rank 0 serves, the ledger counts its reply as N-1 flat sends, "
    "but Gloo's broadcast is a tree: another worker forwards it, so that worker's host sends "
    "more than its ledger and the server's host less; the totals over all hosts agree."
)
SMALL = {"rates": ("1gbit",), "sizes": (100_000, 1_000_000), "steps": 2, "warmup": 1}


@dataclass(frozen=True, kw_only=True)
class NetBenchConfig:
    """One benchmark run: every case at every size, one launch per rate. Validated when built."""

    hosts: int = 4
    rates: tuple[str, ...] = ("1gbit", "10gbit")
    sizes: tuple[int, ...] = (1_000_000, 25_000_000, 100_000_000)
    steps: int = 5  # timed steps per case
    warmup: int = 2  # untimed steps first (>= 1: the first step carries a one-off fingerprint)
    out: Path = Path("bench-results/netcomm")
    time_limit_s: float = 3600.0  # per launch
    cases: tuple[str, ...] = field(default_factory=lambda: tuple(c.label for c in CASES))
    subnet: str = "10.77.0.0/24"

    def __post_init__(self) -> None:
        if isinstance(self.hosts, bool) or not isinstance(self.hosts, int) or self.hosts < 2:
            raise ValueError(f"--hosts must be an int >= 2 (one host has no network), got {self.hosts!r}")
        for name, values in (("rates", self.rates), ("sizes", self.sizes), ("cases", self.cases)):
            if not values:
                raise ValueError(f"--{name} needs at least one value")
            if len(set(values)) != len(values):
                raise ValueError(f"--{name} lists a value twice: {', '.join(map(str, values))}")
        for rate in self.rates:
            NetSpec(hosts=self.hosts, rate=rate, subnet=self.subnet)  # raises naming a bad rate
        for size in self.sizes:
            tensor_shapes(size)  # raises naming a bad size
        for label in self.cases:
            case_by_label(label)
        for name, low in (("steps", 1), ("warmup", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"--{name} must be an int >= {low}, got {v!r}")
        if not self.time_limit_s > 0:
            raise ValueError(f"--time-limit-s must be > 0, got {self.time_limit_s!r}")


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    launches: list[dict[str, Any]] = field(default_factory=list)  # per rate: hosts' interface vs ledger
    failed: list[str] = field(default_factory=list)


def run(cfg: NetBenchConfig) -> Outcome:
    """One launch per rate; a launch that fails is reported and the others go on."""
    out = Outcome()
    why = memory_shortfall(
        cfg.hosts, max(cfg.sizes), overhead_mib=RANK_OVERHEAD_MIB, bytes_per_param=BYTES_PER_PARAM
    )
    if why is not None:
        out.failed.append(f"not run: {why}")
        return out
    for rate in cfg.rates:
        t0, load = time.monotonic(), os.getloadavg()
        print(f"{cfg.hosts} hosts at {rate}: sizes {', '.join(f'{s:,}' for s in cfg.sizes)}", flush=True)
        with tempfile.TemporaryDirectory(prefix="dlion-netcomm-") as tmp:
            spec = RankSpec(
                sizes=cfg.sizes, cases=cfg.cases, steps=cfg.steps, warmup=cfg.warmup, out_dir=tmp,
                timeout_s=min(cfg.time_limit_s, 600.0),
            )  # fmt: skip
            spec.save(Path(tmp) / "spec.json")
            job = HostJob(
                net=NetSpec(hosts=cfg.hosts, rate=rate, subnet=cfg.subnet), procs_per_host=1,
                time_limit_s=cfg.time_limit_s, module="bench.netcomm.rank",
                argv=(str(Path(tmp) / "spec.json"),),
            )  # fmt: skip
            result = run_on_hosts(job)
            if result.code != 0:
                out.failed.append(
                    f"{rate}: the launch exited with {result.code} (its error is printed above)"
                )
                continue
            ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(cfg.hosts)]
        out.rows += launch_rows(rate, ranks)
        out.launches.append(
            {
                "rate": rate,
                "wall_s": result.wall_s,
                # Other work on this machine slows the ranks: the 1-minute load before and after.
                "loadavg_1min": (load[0], os.getloadavg()[0]),
                "hosts": host_totals(result.counters, ranks),
            }
        )
        print(f"{rate}: {time.monotonic() - t0:.1f} s", flush=True)
    return out


def render(cfg: NetBenchConfig, out: Outcome) -> str:
    """The printed and Markdown report."""
    parts = [
        f"{cfg.hosts} emulated hosts x 1 process; {cfg.warmup} warm-up + {cfg.steps} timed steps per case.",
        "",
        "Time per optimizer step (median over timed steps of the slowest rank; "
        "x: adamw-global's time over this):",
        "",
        time_table(out.rows),
        "",
        "Bytes per worker per step (ledger; rank 1 where rank 0 serves; "
        "adamw ÷: adamw-global's sent + received over this):",
        "",
        bytes_table(out.rows),
        "",
        *headlines(out.rows),
    ]
    for launch in out.launches:
        cells = ", ".join(
            f"host {h['host']} tx {h['tx_over_sent']:.3f} rx {h['rx_over_received']:.3f}"
            for h in launch["hosts"]
        )
        load = "{:.1f} and {:.1f}".format(*launch["loadavg_1min"])
        parts.append(
            f"- {launch['rate']}: interface ÷ ledger over the whole launch: {cells}; "
            f"{launch['wall_s']:.0f} s, machine load {load} before and after ({os.cpu_count()} cores)"
        )
    parts += [f"- FAILED {f}" for f in out.failed]
    return "\n".join(parts)


def write_outputs(cfg: NetBenchConfig, out: Outcome, wall: float) -> str:
    """netcomm.json, netcomm.md and netcomm.png under ``cfg.out``; returns the printed report."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    text = render(cfg, out)
    report = {
        "config": {**asdict(cfg), "out": str(cfg.out)},
        "shapes": {str(s): tensor_shapes(s) for s in cfg.sizes},
        "cpu_count": os.cpu_count(),
        "wall_s": wall,
        "rows": [asdict(r) for r in out.rows],
        "launches": out.launches,
        "failed": out.failed,
    }
    (cfg.out / "netcomm.json").write_text(json.dumps(report, indent=2))
    details = f"\n\n## Every measurement\n\n{DETAILS}\n\n"
    title = "# Communication benchmark on an emulated cluster\n\n"
    (cfg.out / "netcomm.md").write_text(title + text + details + detail_table(out.rows) + "\n")
    if out.rows and not plot(out.rows, cfg.out / "netcomm.png"):
        print("matplotlib is missing: no plot (pip install 'dlion[bench]')", file=sys.stderr)
    return text


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_size(text: str) -> int:
    """``25e6``, ``25000000`` or ``25_000_000`` -> 25000000; ValueError naming the text."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"--sizes: {text!r} is not a number of parameters (e.g. 25e6)") from None
    if not value.is_integer() or value < 1:
        raise ValueError(f"--sizes: {text!r} is not a whole, positive number of parameters")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.netcomm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = parser.add_argument
    a(
        "--small",
        action="store_true",
        help="CI size: 1gbit, 100k and 1M parameters, 1 + 2 steps (about a minute)",
    )
    a("--rates", default=None, help="comma-separated link rates (default: 1gbit,10gbit)")
    a("--sizes", default=None, help="comma-separated parameter counts (default: 1e6,25e6,100e6)")
    a("--hosts", type=int, default=4, help="emulated hosts, one process each (default: %(default)s)")
    a("--steps", type=int, default=None, help="timed steps per case (default: 5)")
    a("--warmup", type=int, default=None, help="untimed steps before them (default: 2)")
    a(
        "--cases",
        default=None,
        help="comma-separated cases, e.g. 'adamw-global,dlion-mavo sharded' (default: all)",
    )
    a("--time-limit-s", type=float, default=3600.0, help="bound on each launch (default: %(default)s)")
    a("--out", type=Path, default=Path("bench-results/netcomm"), help="output folder (default: %(default)s)")
    return parser


def config_from_args(args: argparse.Namespace) -> NetBenchConfig:
    """The run ``args`` ask for: --small sets what is not given explicitly. ValueError names a bad value."""
    base: dict[str, Any] = dict(SMALL) if args.small else {}
    if args.rates is not None:
        base["rates"] = tuple(_split(args.rates))
    if args.sizes is not None:
        base["sizes"] = tuple(parse_size(s) for s in _split(args.sizes))
    for name in ("steps", "warmup"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    if args.cases is not None:
        base["cases"] = tuple(_split(args.cases))
    return NetBenchConfig(hosts=args.hosts, out=args.out, time_limit_s=args.time_limit_s, **base)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    reason = namespaces_unavailable()
    if reason is not None:
        print(f"bench.netcomm: cannot emulate hosts on this machine: {reason}", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    out = run(cfg)
    wall = time.monotonic() - t0
    print(write_outputs(cfg, out, wall))
    print(f"\nwall time {wall:.1f} s; wrote {cfg.out / 'netcomm.json'}, netcomm.md, netcomm.png")
    ok = bool(out.rows) and not out.failed and all(r.ledger_ok for r in out.rows)
    return 0 if ok else 1
