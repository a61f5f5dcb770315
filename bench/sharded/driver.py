"""Sharded benchmark: memory, bytes and step time of DDP, FSDP2 and HSDP, with AdamW or dlion.

    python -m bench.sharded [--small] [--hosts 2,4] [--per-host 2] [--rate 1gbit] [--d-model 256]
                            [--layers 2] [--steps 10] [--warmup 2] [--local] [--out bench-results/sharded]

One launch per topology (H hosts x K ranks, the shard group a host) runs every variant of
``bench.sharded.rank`` in turn on the same model (dlion.train.model.ByteGPT) and batches: DDP's
fp32 all-reduce + AdamW, DDP + dlion.attach, FSDP2 on every rank + AdamW, HSDP (replicate =
hosts, shard = a host's ranks) + AdamW, and HSDP + dlion.attach (DistributedLion votes each
shard across the hosts). By default the ranks run on emulated hosts
(``launch.cluster.run_on_hosts``, K ranks per host, links shaped to --rate; needs root);
``--local`` runs them under torchrun on this machine's loopback, unshaped.

Reported per variant: each rank's local bytes of parameters, gradients and optimizer state
(counted from tensors); per step, each host's bytes sent on its interface, on its loopback
(the traffic between its ranks), and for dlion the ledger's bytes across replicas (scope
"net") and FSDP's in the host (scope "node"), summed over the host's ranks; and the median
of the slowest rank's whole step. On emulated hosts, HSDP + DistributedLion's interface
bytes must match the ledger's bytes across replicas within 10% on every host (exit status 1
otherwise). A topology whose variants are all in --out is not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common.flags import ints
from bench.sharded.rank import VARIANTS
from bench.sharded.report import AGREEMENT, agreement, render, row

SMALL = {"d_model": 32, "layers": 1, "steps": 2, "warmup": 1, "hosts": (2,)}
TUNABLE = ("d_model", "layers", "steps", "warmup")


@dataclass(frozen=True, kw_only=True)
class ShardedBenchConfig:
    hosts: tuple[int, ...] = (2, 4)  # one topology each: hosts x per_host ranks
    per_host: int = 2  # ranks per host: the shard group
    rate: str = "1gbit"
    # 1.7M parameters: at 446k (d_model 128) the 66 bytes of headers on each of the vote's
    # small frames came to 15% of its bytes at 4 hosts, past the 10% check (docs/benchmarks.md).
    d_model: int = 256
    layers: int = 2
    steps: int = 10
    warmup: int = 2  # >= 1: FSDP's lazy init, DDP's bucket rebuild, the vote's first-step checks
    local: bool = False
    out: Path = Path("bench-results/sharded")
    time_limit_s: float = 1800.0

    def __post_init__(self) -> None:
        if not self.hosts or any(isinstance(h, bool) or not isinstance(h, int) or h < 2 for h in self.hosts):
            raise ValueError(f"--hosts must list ints >= 2 (HSDP needs replicas), got {list(self.hosts)}")
        for name, low in (("per_host", 2), ("d_model", 4), ("layers", 1), ("steps", 1), ("warmup", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= {low}, got {value!r}")
        if self.d_model % 4:
            raise ValueError(f"--d-model must be a multiple of 4 (4 heads), got {self.d_model}")
        if not self.local:
            from launch.netns import parse_rate

            parse_rate(self.rate)
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s!r}")

    def folder(self, hosts: int) -> Path:
        return self.out / f"h{hosts}x{self.per_host}"


def launch(cfg: ShardedBenchConfig, hosts: int, variants: Sequence[str], tmp: str) -> int:
    """Run ``variants`` on ``hosts`` x per_host ranks; the exit status. Rank files land in tmp."""
    ifname = "lo" if cfg.local else "eth0"
    argv = (
        ",".join(variants), tmp, str(cfg.warmup), str(cfg.steps), str(cfg.d_model), str(cfg.layers),
        str(cfg.per_host), ifname,
    )  # fmt: skip
    if cfg.local:
        ranks = str(hosts * cfg.per_host)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", ranks]
        return subprocess.run([*cmd, "-m", "bench.sharded.rank", *argv], timeout=cfg.time_limit_s).returncode
    from launch.cluster import HostJob, run_on_hosts
    from launch.netns import NetSpec

    job = HostJob(
        net=NetSpec(hosts=hosts, rate=cfg.rate), procs_per_host=cfg.per_host,
        time_limit_s=cfg.time_limit_s, module="bench.sharded.rank", argv=argv,
    )  # fmt: skip
    return run_on_hosts(job).code


def run_topology(cfg: ShardedBenchConfig, hosts: int) -> None:
    """The variants of ``hosts`` x per_host not yet in its folder, in one launch; each
    variant that every rank finished is saved, even if a later one failed."""
    folder = cfg.folder(hosts)
    # Saved variants are reused only by a run of the same size, rate and place.
    run = {k: getattr(cfg, k) for k in ("rate", "d_model", "layers", "steps", "warmup", "local")}
    saved = folder / "run.json"
    if saved.exists() and json.loads(saved.read_text()) != run:
        raise ValueError(f"{folder} holds results of another run ({saved.read_text()}): use another --out")
    todo = [v for v in VARIANTS if not (folder / f"{v}.json").exists()]
    if not todo:
        return
    folder.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(run))
    world = hosts * cfg.per_host
    print(f"{hosts} hosts x {cfg.per_host} ranks: {', '.join(todo)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dlion-sharded-") as tmp:
        code = launch(cfg, hosts, todo, tmp)
        for v in todo:
            files = [Path(tmp, f"{v}.rank{r}.json") for r in range(world)]
            if all(f.exists() for f in files):
                (folder / f"{v}.json").write_text(json.dumps([json.loads(f.read_text()) for f in files]))
    if code != 0:
        raise RuntimeError(f"{hosts} hosts x {cfg.per_host} ranks failed with exit status {code}")


def parse_args(argv: Sequence[str] | None) -> ShardedBenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench.sharded", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help=f"a quick run: {SMALL}")
    p.add_argument("--hosts", type=ints, default=None, help="hosts per topology (default: 2,4)")
    p.add_argument("--per-host", type=int, default=2, help="ranks per host (default: %(default)s)")
    p.add_argument("--rate", default="1gbit", help="each link's rate (default: %(default)s)")
    for name in TUNABLE:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument(
        "--local", action="store_true", help="torchrun on this machine's loopback, no emulated hosts"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results/sharded"), help="default: %(default)s")
    p.add_argument("--time-limit-s", type=float, default=1800.0, help="per launch (default: %(default)s)")
    args = p.parse_args(argv)
    given = {k: getattr(args, k) for k in (*TUNABLE, "hosts") if getattr(args, k) is not None}
    try:
        return ShardedBenchConfig(
            per_host=args.per_host, rate=args.rate, local=args.local, out=args.out,
            time_limit_s=args.time_limit_s, **{**(SMALL if args.small else {}), **given},
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    raise AssertionError("unreachable: parser.error exits")


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    if not cfg.local:
        from launch.netns import namespaces_unavailable

        reason = namespaces_unavailable()
        if reason is not None:
            print(f"bench.sharded: cannot emulate hosts ({reason}); run with --local", file=sys.stderr)
            return 1
    rows: list[dict[str, Any]] = []
    for hosts in cfg.hosts:
        try:
            run_topology(cfg, hosts)
        except ValueError as e:
            print(f"bench.sharded: {e}", file=sys.stderr)
            return 2
        for v in VARIANTS:
            rows.append(row(json.loads((cfg.folder(hosts) / f"{v}.json").read_text()), local=cfg.local))
    checks = [] if cfg.local else [agreement(r) for r in rows if r["variant"] == "hsdp-dlion"]
    table = render(rows, checks, where=None if cfg.local else cfg.rate, steps=cfg.steps, warmup=cfg.warmup)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "sharded.md").write_text(table + "\n")
    config = {**cfg.__dict__, "out": str(cfg.out)}
    (cfg.out / "sharded.json").write_text(
        json.dumps({"config": config, "rows": rows, "agreement": checks}, indent=1)
    )
    print(table)
    failed = [c for c in checks if not c["ok"]]
    for c in failed:
        print(
            f"bench.sharded: {c['topology']}: a host's interface bytes differ from the ledger's across "
            f"replicas by more than {AGREEMENT:.0%} (ratios {c['ratios']})",
            file=sys.stderr,
        )
    return 1 if failed else 0
