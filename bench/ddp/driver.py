"""DDP benchmark: step time and bytes of the ways gradients meet under DistributedDataParallel.

    python -m bench.ddp [--small] [--hosts 4] [--rate 1gbit] [--d-model 256] [--layers 4]
                        [--steps 10] [--batch 8] [--local] [--out bench-results/ddp]

One launch per variant (``bench.ddp.rank``): DDP's fp32 all-reduce, DDP with torch's PowerSGD
hook at rank 1 and 4 (then AdamW), DDP with dlion.attach, and DistributedLion without DDP, on
the same model (dlion.train.model.ByteGPT) and batches. By default the ranks run on emulated
hosts (``launch.cluster.run_on_hosts``, one rank per host, links shaped to --rate; needs root);
``--local`` runs them under torchrun on this machine's loopback, unshaped. Reported per
variant: the median over timed steps of the slowest rank's whole step (forward, backward,
optimizer), each rank's interface bytes per step and, for dlion, its ledger's beside them,
and the bytes against fp32 DDP. A variant whose result exists in --out is not run again.
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

VARIANTS = ("ddp-fp32", "ddp-powersgd-r1", "ddp-powersgd-r4", "ddp-dlion", "dlion")
WHAT = {
    "ddp-fp32": "DDP, fp32 all-reduce + AdamW",
    "ddp-powersgd-r1": "DDP + PowerSGD hook, rank 1 + AdamW",
    "ddp-powersgd-r4": "DDP + PowerSGD hook, rank 4 + AdamW",
    "ddp-dlion": "DDP + dlion.attach (sharded vote)",
    "dlion": "DistributedLion (sharded), no DDP",
}
SMALL = {"d_model": 64, "layers": 2, "steps": 3, "warmup": 3}


@dataclass(frozen=True, kw_only=True)
class DDPBenchConfig:
    hosts: int = 4
    rate: str = "1gbit"
    d_model: int = 256
    layers: int = 4
    steps: int = 10
    warmup: int = 3  # >= 3: compilation, DDP's bucket rebuild, PowerSGD's 2 uncompressed steps
    batch: int = 8  # sequences of 128 bytes per rank per step
    burst_bytes: int | None = None  # the links' tbf bucket (None: launch.netns's default)
    local: bool = False
    out: Path = Path("bench-results/ddp")
    time_limit_s: float = 1800.0

    def __post_init__(self) -> None:
        for name, low in (
            ("hosts", 2),
            ("d_model", 4),
            ("layers", 1),
            ("steps", 1),
            ("warmup", 3),
            ("batch", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= {low}, got {value!r}")
        if self.d_model % 4:
            raise ValueError(f"--d-model must be a multiple of 4 (4 heads), got {self.d_model}")


def run_variant(cfg: DDPBenchConfig, variant: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="dlion-ddp-") as tmp:
        ifname = "lo" if cfg.local else "eth0"
        argv = (variant, tmp, str(cfg.warmup), str(cfg.steps), str(cfg.d_model), str(cfg.layers), ifname,
                str(cfg.batch))  # fmt: skip
        if cfg.local:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(cfg.hosts),
            ]
            code = subprocess.run([*cmd, "-m", "bench.ddp.rank", *argv], timeout=cfg.time_limit_s).returncode
        else:
            from launch.cluster import HostJob, run_on_hosts
            from launch.netns import NetSpec

            net = NetSpec(hosts=cfg.hosts, rate=cfg.rate, burst_bytes=cfg.burst_bytes)
            job = HostJob(
                net=net, procs_per_host=1, time_limit_s=cfg.time_limit_s, module="bench.ddp.rank", argv=argv
            )
            code = run_on_hosts(job).code
        if code != 0:
            raise RuntimeError(f"variant {variant} failed with exit status {code}")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(cfg.hosts)]
    if cfg.local:  # one loopback for all ranks: its bytes are everyone's
        for r in ranks:
            r["interface_tx_bytes_per_step"] /= cfg.hosts
    return ranks


def row(ranks: list[dict[str, Any]], fp32_bytes: float | None) -> dict[str, Any]:
    wire = sum(r["interface_tx_bytes_per_step"] for r in ranks) / len(ranks)
    ledger = [r["ledger_sent_bytes_per_step"] for r in ranks if r["ledger_sent_bytes_per_step"] is not None]
    step_s = [max(r["step_s"][i] for r in ranks) for i in range(len(ranks[0]["step_s"]))]
    return {
        "variant": ranks[0]["variant"],
        "n_params": ranks[0]["n_params"],
        "step_ms": 1000 * sorted(step_s)[len(step_s) // 2],
        "wire_bytes_per_rank_step": wire,
        "ledger_bytes_per_rank_step": sum(ledger) / len(ledger) if ledger else None,
        "fewer_than_fp32": fp32_bytes / wire if fp32_bytes else None,
        "loss_first_last": (ranks[0]["losses"][0], ranks[0]["losses"][-1]),
    }


def render(cfg: DDPBenchConfig, rows: list[dict[str, Any]]) -> str:
    where = "this machine's loopback, unshaped" if cfg.local else f"{cfg.hosts} emulated hosts at {cfg.rate}"
    head = [
        f"{rows[0]['n_params']:,} parameters, {cfg.hosts} ranks on {where}; {cfg.steps} timed steps "
        f"after {cfg.warmup}; step: forward + backward + optimizer, median of the slowest rank.",
        "",
        "| variant | step ms | x fp32 DDP time | sent per rank per step | ledger | x fewer bytes |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    base = next((r["step_ms"] for r in rows if r["variant"] == "ddp-fp32"), None)
    for r in rows:
        led = r["ledger_bytes_per_rank_step"]
        slower = r["step_ms"] / base if base else float("nan")
        ledger = "-" if led is None else f"{led / 1e3:,.1f} kB"
        fewer = "-" if r["fewer_than_fp32"] is None else f"{r['fewer_than_fp32']:.1f}"
        head.append(
            f"| {WHAT[r['variant']]} | {r['step_ms']:.1f} | {slower:.2f} "
            f"| {r['wire_bytes_per_rank_step'] / 1e3:,.1f} kB | {ledger} | {fewer} |"
        )
    return "\n".join(head)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ddp", description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help=f"a quick run: {SMALL}")
    p.add_argument("--hosts", type=int, default=4, help="ranks, one per emulated host (default: %(default)s)")
    p.add_argument("--rate", default="1gbit", help="each link's rate (default: %(default)s)")
    for name in ("d_model", "layers", "steps", "warmup", "batch"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument(
        "--local", action="store_true", help="torchrun on this machine's loopback, no emulated hosts"
    )
    p.add_argument("--out", type=Path, default=Path("bench-results/ddp"), help="default: %(default)s")
    args = p.parse_args(argv)
    given = {
        k: getattr(args, k)
        for k in ("d_model", "layers", "steps", "warmup", "batch")
        if getattr(args, k) is not None
    }
    try:
        cfg = DDPBenchConfig(
            hosts=args.hosts,
            rate=args.rate,
            local=args.local,
            out=args.out,
            **{**(SMALL if args.small else {}), **given},
        )
    except ValueError as e:
        p.error(str(e))
    if not cfg.local:
        from launch.netns import namespaces_unavailable

        reason = namespaces_unavailable()
        if reason is not None:
            print(f"bench.ddp: cannot emulate hosts ({reason}); run with --local", file=sys.stderr)
            return 1
    cfg.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    fp32 = None
    for variant in VARIANTS:
        saved = cfg.out / f"{variant}.json"
        if not saved.exists():
            print(f"{variant}: {WHAT[variant]}", flush=True)
            saved.write_text(json.dumps(run_variant(cfg, variant)))
        ranks = json.loads(saved.read_text())
        r = row(ranks, fp32)
        fp32 = fp32 if fp32 is not None else r["wire_bytes_per_rank_step"]
        rows.append(r)
    table = render(cfg, rows)
    (cfg.out / "ddp.md").write_text(table + "\n")
    (cfg.out / "ddp.json").write_text(
        json.dumps({"config": {**cfg.__dict__, "out": str(cfg.out)}, "rows": rows}, indent=1)
    )
    print(table)
    return 0
