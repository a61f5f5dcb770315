"""The hierarchical backend: H nodes of K Gloo ranks (process subgroups on one machine)
against the simulation of exactly that algorithm: H voters, each on its node's mean
gradient (summed in local-rank order, divided by K), bit for bit; and its ledger, split
into bytes inside nodes and between them, against the cost model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from test_distributed_lion import BUCKET_NUMEL, GROUPS, STEPS, feed_steps, init_params, make_grads

from dlion.aggregate.hierarchy import NodeLayout
from dlion.compress.buckets import plan_buckets
from dlion.worker.lion.route_hier import SHARD_STATE, HierarchicalRoute

from multiproc import run_ok
from sim import simulate


def _train(rank: int, world: int, per_node: int, vote: str, tie: str) -> dict[str, Any]:
    import dlion

    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    groups = [
        {"params": [params[i] for i in g.indices], "lr": g.lr, "weight_decay": g.weight_decay} for g in GROUPS
    ]
    opt = dlion.DistributedLion(
        groups, vote=vote, tie=tie, seed=7, bucket_numel=BUCKET_NUMEL,  # type: ignore[arg-type]
        backend="hierarchical", procs_per_node=per_node,
    )  # fmt: skip
    feed_steps(opt, params, rank, world)
    order = [i for g in GROUPS for i in g.indices]
    pieces = {}
    for k, bucket in enumerate(opt.plan.buckets):
        route = opt.plan.routes[k]
        assert isinstance(route, HierarchicalRoute)
        for piece in route.pieces:
            i = bucket.slots[piece.slot].index
            p = params[i]
            if SHARD_STATE in opt.state.get(p, {}):
                pieces[i] = (piece.start, opt.state[p][SHARD_STATE].numpy().copy())
    full = [i for i in order if "exp_avg" in opt.state.get(params[i], {})]
    return {
        "params": [p.detach().numpy().copy() for p in params],
        "pieces": pieces,
        "full_momenta": full,  # none: a rank keeps its shard's momentum only
        "ledger": opt.ledger.summary(),
        "step_bytes": opt.ledger.step_bytes(),
    }


def node_grads(world: int, per_node: int) -> list[list[list[np.ndarray | None]]]:
    """[step][node][tensor]: each node's mean gradient, summed in local-rank order; None where
    no rank anywhere has one (a rank without one adds zeros)."""
    out = []
    for step_grads in make_grads(world):
        nodes = []
        for h in range(world // per_node):
            ranks = step_grads[h * per_node : (h + 1) * per_node]
            mean: list[np.ndarray | None] = []
            for t in range(len(step_grads[0])):
                if all(r[t] is None for r in step_grads):
                    mean.append(None)
                    continue
                total = np.zeros_like(next(r[t] for r in step_grads if r[t] is not None))
                for r in ranks:
                    total = total + (r[t] if r[t] is not None else np.float32(0))
                mean.append((total / np.float32(per_node)).astype(np.float32))
            nodes.append(mean)
        out.append(nodes)
    return out


CASES = [
    (2, 2, "majority", "random"),  # H = 2: even splits take the tie coin
    (2, 2, "average", "random"),
    (3, 2, "majority", "random"),
    (3, 2, "average", "random"),
]


@pytest.mark.parametrize(("nodes", "per_node", "vote", "tie"), CASES)
def test_nodes_vote_like_the_simulation_bit_for_bit(nodes: int, per_node: int, vote: str, tie: str) -> None:
    world = nodes * per_node
    results = run_ok(_train, world, per_node=per_node, vote=vote, tie=tie)
    kw = {"vote": vote, "tie": tie, "seed": 7, "bucket_numel": BUCKET_NUMEL}
    expect, moms = simulate(init_params(), GROUPS, node_grads(world, per_node), **kw)  # type: ignore[arg-type]
    for rank, got in enumerate(results):
        for i, (a, b) in enumerate(zip(got["params"], expect, strict=True)):
            assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), (rank, i)
        h = NodeLayout.of(rank, world, per_node).node
        for i, (start, m) in got["pieces"].items():
            want = moms[h][i][start : start + m.size]
            assert m.view(np.uint32).tolist() == want.view(np.uint32).tolist(), (rank, i)
        assert got["full_momenta"] == []
    # Every rank of a node holds a different shard: together, the whole momentum.
    held = [sum(m.size for _, m in r["pieces"].values()) for r in results[:per_node]]
    assert sum(held) == sum(p.size for p in init_params())
    assert not np.array_equal(results[0]["params"][0], init_params()[0])


def _bits_per_step(nodes: int, per_node: int, planes: int) -> tuple[int, int]:
    """Cost model, bits a rank sends per step after the first: (inside its node, between nodes)."""
    numels = [int(np.prod(p.shape)) for p in init_params()]
    node = net = 0
    for b in plan_buckets(numels, BUCKET_NUMEL, 16 * nodes * per_node):
        shard = b.nbytes // per_node  # bytes of one local rank's shard
        node += 32 * 8 * shard * (per_node - 1)  # fp32 gradients of the other shards
        node += planes * 8 * shard * (per_node - 1)  # the voted shards, ring all_gather
        net += 8 * shard * (nodes - 1) // nodes  # sign bits, all_to_all of the shard
        net += planes * 8 * shard * (nodes - 1) // nodes  # the voted sub-shards
    meta = 8 * (4 + 1) * (nodes * per_node - 1)  # the step metadata all_gather
    return node, net + meta


def test_ledger_splits_node_and_network_bytes_as_the_cost_model() -> None:
    nodes, per_node = 3, 2
    results = run_ok(_train, nodes * per_node, per_node=per_node, vote="majority", tie="random")
    node_bits, net_bits = _bits_per_step(nodes, per_node, planes=1)
    for got in results:
        steps = got["step_bytes"]
        assert all(sent * 8 == node_bits + net_bits for sent, _ in steps[1:])
        led = got["ledger"]
        assert led["node_bytes_sent"] * 8 == STEPS * node_bits
    # Between nodes: 1/K of the flat sharded vote's bits per parameter, plus metadata.
    assert net_bits < node_bits


def test_bad_layouts_are_named() -> None:
    with pytest.raises(ValueError, match="world size 6 is not a multiple of procs_per_node 4"):
        NodeLayout.of(0, 6, 4)
    import dlion

    with pytest.raises(ValueError, match="procs_per_node must be an int >= 1 or None, got 0"):
        dlion.DistributedLion([torch.nn.Parameter(torch.zeros(2))], backend="hierarchical", procs_per_node=0)
