"""Projection of HSDP: S GPUs per node shard the model (FSDP2), the H = N/S nodes replicate it.

    python -m bench.project.hsdp [--params 125e6] [--per-node 8] [--workers 64,128,256,512,1024]
        [--gbits 100,400] [--out bench-results/project-hsdp]

Per step and per rank, communication time under the alpha-beta model of
``bench.project.model``, links as in ``bench.project.hier`` (NVLink-class inside the node, one
network link per GPU at the given rate between nodes), for:

- DDP: fp32 ring all-reduce of all d gradients over every GPU (the reference);
- HSDP + AdamW, fp32 or bf16: inside the node, FSDP's reduce-scatter of the fp32 gradients,
  then the all-reduce of each rank's 1/S shard across the H replicas, in fp32 or bf16:
  2(H-1)/H x 4d/S (fp32) or 2d/S (bf16) bytes sent per rank;
- HSDP + DistributedLion (dlion.attach): the same reduce-scatter, then the sharded vote of the
  shard's signs across the H replicas (bench.project.hier's plan over 1/S of the bits):
  2(H-1)/H x d/(8S) bytes per rank, plus the vote's step metadata.

Every HSDP plan also carries FSDP's parameter all-gathers inside the node: fp32 parameters,
twice a step (forward, and backward after ``reshard_after_forward``), (S-1)/S x 4d bytes sent
per rank each. The in-node collectives run as rings (NCCL's choice on 8 GPUs); a ring
reduce-scatter costs what all_to_all's pairwise exchange does, (S-1)(alpha + 4d/S beta), so it
is priced as one. The network's collectives are timed as rings, and as the faster of ring and
tree ("log-depth"). Nothing overlaps with compute or with each other (FSDP overlaps its
all-gathers with compute in practice: read the node column as an upper bound).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.comm import model as cm
from bench.comm.model import WORD_BYTES
from bench.comm.rank import BUCKET_NUMEL, tensor_numels
from bench.project.hier import NET_ALPHA_US, NVLINK_ALPHA_US, NVLINK_GBYTES, Step, _sent
from bench.project.model import Algorithm, collective_time

PARAM_BYTES = 4  # fp32 parameters in FSDP's all-gathers (no MixedPrecisionPolicy)
GATHERS_PER_STEP = 2  # forward, and backward after reshard_after_forward
METHODS: dict[str, str] = {
    "ddp-fp32": "DDP, fp32 ring all-reduce over every GPU",
    "hsdp-adamw-fp32": "HSDP + AdamW, fp32 replica all-reduce",
    "hsdp-adamw-bf16": "HSDP + AdamW, bf16 replica all-reduce",
    "hsdp-dlion": "HSDP + DistributedLion (sharded vote)",
}


def _round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def shard_numels(numels: Sequence[int], per_node: int) -> list[int]:
    """Each tensor's local shard: FSDP splits dimension 0 into S pieces, the first ones full."""
    return [-(-n // per_node) for n in numels]


def vote_steps(nodes: int, numels: Sequence[int]) -> list[Step]:
    """The sharded vote of the local shards across the H replicas (bench.project.hier's plan
    between nodes): the step metadata, then per bucket the bits' all_to_all and the result's
    all_gather."""
    steps = [Step("net", "meta", "all_gather", cm.meta_bytes(nodes, len(numels)) // (nodes - 1), nodes)]
    for k, s in enumerate(cm.bucket_bytes(list(numels), BUCKET_NUMEL, WORD_BYTES * nodes)):
        steps.append(Step("net", f"bucket{k}.shards", "all_to_all", s, nodes))
        steps.append(Step("net", f"bucket{k}.result", "all_gather", s // nodes, nodes))
    return steps


def hsdp_plan(method: str, n: int, per_node: int, d: int) -> list[Step]:
    """The collectives of one steady step of ``method`` on N GPUs, S = per_node to a node."""
    nodes = n // per_node
    if method == "ddp-fp32":
        return [Step("net", "grads", "all_reduce", 4 * _round_up(d, n), n)]
    shards = shard_numels(tensor_numels(d), per_node)
    shard = sum(shards)
    steps = [
        *(Step("node", "fsdp.all_gather", "all_gather", PARAM_BYTES * shard, per_node),) * GATHERS_PER_STEP,
        Step("node", "fsdp.reduce_scatter", "all_to_all", 4 * shard * per_node, per_node),
    ]
    if method == "hsdp-dlion":
        return steps + vote_steps(nodes, shards)
    word = {"hsdp-adamw-fp32": 4, "hsdp-adamw-bf16": 2}.get(method)
    if word is None:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return [*steps, Step("net", "fsdp.all_reduce", "all_reduce", word * _round_up(shard, nodes), nodes)]


def comm_ms(steps: Sequence[Step], gbits: float, net_algorithm: Algorithm) -> float:
    """Milliseconds: node collectives as rings on NVLink, the network's by ``net_algorithm``."""
    total = 0.0
    for st in steps:
        node = st.scope == "node"
        alpha = (NVLINK_ALPHA_US if node else NET_ALPHA_US) * 1e-6
        beta = 1 / (NVLINK_GBYTES * 1e9) if node else 8 / (gbits * 1e9)
        total += collective_time(
            st.op, st.size, st.n, alpha, beta, algorithm="ring" if node else net_algorithm
        )
    return 1e3 * total


@dataclass(frozen=True)
class HsdpRow:
    method: str
    n: int
    nodes: int
    gbits: float
    ring_ms: float  # every collective a ring
    best_ms: float  # the network's collectives the faster of ring and tree
    node_ms: float  # of both: FSDP's collectives inside the node
    net_bytes: int  # sent per rank per step between nodes
    node_bytes: int  # sent per rank per step inside the node


@dataclass(frozen=True, kw_only=True)
class HsdpProjectConfig:
    params: int = 125_000_000
    per_node: int = 8
    workers: tuple[int, ...] = (64, 128, 256, 512, 1024)
    gbits: tuple[float, ...] = (100.0, 400.0)
    out: Path = Path("bench-results/project-hsdp")

    def __post_init__(self) -> None:
        if self.params < 1 or self.per_node < 2:
            raise ValueError(f"--params must be >= 1 and --per-node >= 2, got {self.params}, {self.per_node}")
        bad = [n for n in self.workers if n % self.per_node or n < 2 * self.per_node]
        if not self.workers or bad:
            raise ValueError(
                f"--workers must be multiples of --per-node {self.per_node}, 2 nodes or more: got "
                f"{list(self.workers)}"
            )
        if not self.gbits or any(not g > 0 for g in self.gbits):
            raise ValueError(f"--gbits must be link rates > 0, got {list(self.gbits)}")


def project_rows(cfg: HsdpProjectConfig) -> list[HsdpRow]:
    rows = []
    for g in cfg.gbits:
        for method in METHODS:
            for n in cfg.workers:
                steps = hsdp_plan(method, n, cfg.per_node, cfg.params)
                node = [st for st in steps if st.scope == "node"]
                rows.append(HsdpRow(
                    method, n, n // cfg.per_node, g, comm_ms(steps, g, "ring"), comm_ms(steps, g, "best"),
                    comm_ms(node, g, "ring"), _sent(steps, "net"), _sent(steps, "node"),
                ))  # fmt: skip
    return rows


def render(cfg: HsdpProjectConfig, rows: Sequence[HsdpRow]) -> str:
    """Markdown: the bytes per rank (the same at every bandwidth), then a time table per bandwidth."""
    first = cfg.gbits[0]
    out = [
        f"{cfg.params / 1e6:.1f}M parameters, {cfg.per_node} GPUs per node (the shard group) on "
        f"{NVLINK_GBYTES:g} GB/s links. MB sent per rank per step, inside the node and between nodes:",
        "",
        "| method | inside the node | " + " | ".join(f"net, N={n}" for n in cfg.workers) + " |",
        "|---|--:|" + "--:|" * len(cfg.workers),
    ]
    for method, label in METHODS.items():
        mine = [r for r in rows if r.method == method and r.gbits == first]
        nets = " | ".join(f"{r.net_bytes / 1e6:,.2f}" for r in mine)
        out.append(f"| {label} | {mine[0].node_bytes / 1e6:,.1f} | {nets} |")
    base = {(r.n, r.gbits): r.ring_ms for r in rows if r.method == "ddp-fp32"}
    for g in cfg.gbits:
        out += [
            "",
            f"{g:g} Gbit/s: communication ms per step, the network's collectives as rings / log-depth "
            "(x fewer than DDP's, rings):",
            "",
            "| method | " + " | ".join(f"N={n}" for n in cfg.workers) + " |",
            "|---|" + "--:|" * len(cfg.workers),
        ]
        for method, label in METHODS.items():
            mine = [r for r in rows if r.method == method and r.gbits == g]
            cells = [f"{r.ring_ms:.2f} / {r.best_ms:.2f} ({base[r.n, g] / r.ring_ms:.1f}x)" for r in mine]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        node = next(r.node_ms for r in rows if r.method != "ddp-fp32" and r.gbits == g)
        out += ["", f"Of each HSDP row, FSDP's collectives inside the node: {node:.2f} ms."]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.project.hsdp", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=125e6)
    p.add_argument("--per-node", type=int, default=8)
    p.add_argument("--workers", default="64,128,256,512,1024")
    p.add_argument("--gbits", default="100,400")
    p.add_argument("--out", type=Path, default=Path("bench-results/project-hsdp"))
    args = p.parse_args(argv)
    try:
        cfg = HsdpProjectConfig(
            params=int(args.params), per_node=args.per_node, out=args.out,
            workers=tuple(int(v) for v in args.workers.split(",")),
            gbits=tuple(float(v) for v in args.gbits.split(",")),
        )  # fmt: skip
    except ValueError as e:
        p.error(str(e))
    rows = project_rows(cfg)
    text = render(cfg, rows)
    print(text)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "project_hsdp.md").write_text(text + "\n")
    (cfg.out / "project_hsdp.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
