"""Projection of the hierarchical vote: K GPUs per node on NVLink-class links, nodes on a network.

    python -m bench.project.hier [--params 125e6] [--per-node 8] [--workers 8,16,...,1024]
        [--gbits 100,400] [--out bench-results/project-hier]

Per step and per rank, communication time under the alpha-beta model of
``bench.project.model`` for three plans: fp32 ring all-reduce over every GPU (the usual
data-parallel baseline), dlion-mavo's flat sharded vote over every GPU, and the
hierarchical vote (dlion.aggregate.hierarchy): inside each node an fp32 all_to_all of the
gradient shards and an all_gather of the voted bits on the fast links; between nodes the
sharded vote of 1/K of the bits over the H = N/K nodes. Every GPU is taken to have a
network link of its own at the given rate (as in 8-GPU nodes with 8 NICs), so a node's K
ranks use K paths at once. "rings" times every collective as a ring; "log-depth" takes the
faster of ring and tree per collective. The step metadata all_gather runs over all N.
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
from bench.project.model import FP32_RING, Method, Op, collective_time, plan

NVLINK_GBYTES, NVLINK_ALPHA_US = 450.0, 2.0  # per direction, per GPU (H100 NVLink 4), and start-up
NET_ALPHA_US = 5.0  # RDMA fabrics from 100 Gbit/s up (bench.project's default)
SHARDED = Method(label="dlion-mavo sharded (flat)", family="dlion", backend="sharded")


@dataclass(frozen=True)
class Step:
    scope: str  # "node" or "net"
    name: str
    op: Op
    size: int  # as bench.project.model.Collective: all_to_all, the send buffer; all_gather, one chunk
    n: int


def hierarchical_plan(n: int, per_node: int, numels: Sequence[int], planes: int = 1) -> list[Step]:
    """The collectives of one steady step of backend "hierarchical" (majority vote: 1 plane)."""
    nodes = n // per_node
    steps = [Step("net", "meta", "all_gather", cm.meta_bytes(n, len(numels)) // (n - 1), n)]
    for k, s in enumerate(cm.bucket_bytes(list(numels), BUCKET_NUMEL, WORD_BYTES * n)):
        shard = s // per_node
        if per_node > 1:
            steps.append(Step("node", f"bucket{k}.grads", "all_to_all", 32 * s, per_node))
        if nodes > 1:
            steps.append(Step("net", f"bucket{k}[shard].shards", "all_to_all", shard, nodes))
            steps.append(
                Step("net", f"bucket{k}[shard].result", "all_gather", planes * shard // nodes, nodes)
            )
        if per_node > 1:
            steps.append(Step("node", f"bucket{k}.node_result", "all_gather", planes * shard, per_node))
    return steps


@dataclass(frozen=True)
class Row:
    n: int
    nodes: int
    gbits: float
    fp32_ring_ms: float
    sharded_ring_ms: float
    sharded_best_ms: float
    hier_ring_ms: float
    hier_best_ms: float
    hier_net_bytes: int  # sent per rank per step between nodes
    hier_node_bytes: int  # sent per rank per step inside the node


def _time(steps: Sequence[Step], gbits: float, algorithm: str) -> float:
    total = 0.0
    for st in steps:
        if st.scope == "node":
            alpha, beta = NVLINK_ALPHA_US * 1e-6, 1 / (NVLINK_GBYTES * 1e9)
        else:
            alpha, beta = NET_ALPHA_US * 1e-6, 8 / (gbits * 1e9)
        total += collective_time(st.op, st.size, st.n, alpha, beta, algorithm=algorithm)  # type: ignore[arg-type]
    return 1e3 * total


def _flat(method: Method, n: int, numels: Sequence[int]) -> list[Step]:
    return [Step("net", c.name, c.op, c.size, n) for c in plan(method, n, numels)]


def _sent(steps: Sequence[Step], scope: str) -> int:
    per = {"all_reduce": lambda s, n: 2 * (n - 1) * s // n, "all_gather": lambda s, n: (n - 1) * s,
           "all_to_all": lambda s, n: (n - 1) * s // n}  # fmt: skip
    return sum(per[st.op](st.size, st.n) for st in steps if st.scope == scope)


def project_rows(d: int, per_node: int, workers: Sequence[int], gbits: Sequence[float]) -> list[Row]:
    numels = tensor_numels(d)
    rows = []
    for g in gbits:
        for n in workers:
            if n % per_node or n < 2:
                raise ValueError(f"workers must be multiples of --per-node {per_node} and >= 2, got {n}")
            hier = hierarchical_plan(n, per_node, numels)
            fp32 = _flat(FP32_RING, n, numels)
            sharded = _flat(SHARDED, n, numels)
            rows.append(Row(
                n, n // per_node, g, _time(fp32, g, "ring"), _time(sharded, g, "ring"),
                _time(sharded, g, "best"), _time(hier, g, "ring"), _time(hier, g, "best"),
                _sent(hier, "net"), _sent(hier, "node"),
            ))  # fmt: skip
    return rows


def render(rows: Sequence[Row], d: int, per_node: int) -> str:
    out = [f"{d / 1e6:.1f}M parameters, {per_node} GPUs per node on {NVLINK_GBYTES:g} GB/s links; "
           "communication ms per step (x fewer than fp32 ring all-reduce)", ""]  # fmt: skip
    head = "| Gbit/s | GPUs | nodes | fp32 ring | sharded, rings | sharded, log-depth | hierarchical, rings | hierarchical, log-depth | net MB sent |"  # noqa: E501
    out += [head, "|" + "--:|" * 9]
    for r in rows:
        x = r.fp32_ring_ms
        cells = [
            f"{v:.2f} ({x / v:.1f}x)"
            for v in (r.sharded_ring_ms, r.sharded_best_ms, r.hier_ring_ms, r.hier_best_ms)
        ]
        out.append(
            f"| {r.gbits:g} | {r.n} | {r.nodes} | {x:.2f} | "
            + " | ".join(cells)
            + f" | {r.hier_net_bytes / 1e6:.2f} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.project.hier", description=__doc__.split("\n\n")[0])
    p.add_argument("--params", type=float, default=125e6)
    p.add_argument("--per-node", type=int, default=8)
    p.add_argument("--workers", default="8,16,32,64,128,256,512,1024")
    p.add_argument("--gbits", default="100,400")
    p.add_argument("--out", type=Path, default=Path("bench-results/project-hier"))
    args = p.parse_args(argv)
    try:
        workers = [int(v) for v in args.workers.split(",")]
        gbits = [float(v) for v in args.gbits.split(",")]
        rows = project_rows(int(args.params), args.per_node, workers, gbits)
    except ValueError as e:
        p.error(str(e))
    text = render(rows, int(args.params), args.per_node)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "project_hier.md").write_text(text + "\n")
    (args.out / "project_hier.json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
