"""DistributedLion on 2-4 Gloo ranks against the single-process NumPy simulation, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multiproc import run_ok
from sim import Group, simulate, start_bits

SHAPES = [(7,), (3, 5), (33,), (4, 4, 3), (1,), (130,), (16, 8)]
STEPS = 4
BUCKET_NUMEL = 128  # small, so the tensors spread over several buckets


def make_grads(world: int, seed: int = 0) -> list[list[list[np.ndarray | None]]]:
    """[step][rank][tensor]; exact zeros on step 0 (c == 0), a tensor absent on one rank at
    step 1, and tensor 4 absent on every rank at step 2."""
    out: list[list[list[np.ndarray | None]]] = []
    for step in range(STEPS):
        per_rank: list[list[np.ndarray | None]] = []
        for rank in range(world):
            rng = np.random.default_rng([seed, step, rank])
            grads: list[np.ndarray | None] = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
            if step == 0:
                for g in grads:
                    assert g is not None
                    g.reshape(-1)[::3] = 0.0
            if step == 1 and rank == world - 1:
                grads[2] = None
            if step == 2:
                grads[4] = None
            per_rank.append(grads)
        out.append(per_rank)
    return out


def feed_steps(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], rank: int, world: int) -> None:
    """Every step of ``make_grads(world)`` on ``rank``: its gradients (None where absent), then step()."""
    grads = make_grads(world)
    for step in range(STEPS):
        for p, g in zip(params, grads[step][rank], strict=True):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()


def init_params() -> list[np.ndarray]:
    rng = np.random.default_rng(1234)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


GROUPS = [Group([0, 1, 2, 3], lr=0.01, weight_decay=0.1), Group([4, 5, 6], lr=0.003, weight_decay=0.0)]


def _train(
    rank: int,
    world: int,
    vote: str,
    tie: str,
    seed: int,
    backend: str = "allgather",
    transport: str = "torch",
    process_group: object = None,
    server: object = None,
    cautious_wd: bool = False,
    byzantine: object = None,
    binarize: str = "sign",
) -> dict[str, object]:
    import dlion

    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    groups = [
        {"params": [params[i] for i in g.indices], "lr": g.lr, "weight_decay": g.weight_decay} for g in GROUPS
    ]
    opt = dlion.DistributedLion(
        groups,
        vote=vote,  # type: ignore[arg-type]
        tie=tie,  # type: ignore[arg-type]
        seed=seed,
        bucket_numel=BUCKET_NUMEL,
        backend=backend,
        transport=transport,
        process_group=process_group,  # type: ignore[arg-type]
        server=server,  # type: ignore[arg-type]
        cautious_wd=cautious_wd,
        byzantine=byzantine,  # type: ignore[arg-type]
        binarize=binarize,  # type: ignore[arg-type]
    )
    grads = make_grads(world)
    for step in range(STEPS):
        for p, g in zip(params, grads[step][rank], strict=True):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()
    server_totals = opt.close()
    order = [i for g in GROUPS for i in g.indices]
    moms = {
        i: opt.state[params[i]]["exp_avg"].numpy().reshape(-1).copy() for i in order if params[i] in opt.state
    }
    return {
        "params": [p.detach().numpy().copy() for p in params],
        "moms": moms,
        "ledger": opt.ledger.summary(),
        "step_bytes": opt.ledger.step_bytes(),
        "records": [[(r.name, r.sent, r.received) for r in recs] for recs in opt.ledger.steps],
        "server_totals": server_totals,
    }


CASES = [
    (2, "majority", "random"),
    (2, "majority", "zero"),
    (2, "average", "random"),
    (3, "majority", "random"),
    (3, "average", "random"),
    (4, "majority", "random"),
    (4, "majority", "zero"),
    (4, "average", "random"),
]


def _run_cases(rank: int, world: int, cases: list[tuple[str, str, str]]) -> list[dict[str, object]]:
    return [_train(rank, world, vote, tie, seed=7, backend=backend) for vote, tie, backend in cases]


def assert_matches_simulation(
    results: list[list[dict]], cases: list[tuple[str, str, str]], world: int
) -> None:
    """Every rank's parameters and momenta equal the NumPy simulation's, bit for bit."""
    grads = make_grads(world)
    for c, (vote, tie, backend) in enumerate(cases):
        expect, moms = simulate(
            init_params(), GROUPS, grads, vote=vote, tie=tie, seed=7, bucket_numel=BUCKET_NUMEL
        )
        for rank in range(world):
            assert_bits_equal(results[rank][c], expect, moms[rank], (vote, tie, backend, rank))


def assert_bits_equal(got: dict, params: list[np.ndarray], moms: list[np.ndarray], where: tuple) -> None:
    """One rank's parameters and momenta equal the simulation's, bit for bit."""
    for i, (a, b) in enumerate(zip(got["params"], params, strict=True)):
        assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), (*where, i)
    for i, m in got["moms"].items():
        assert m.view(np.uint32).tolist() == moms[i].view(np.uint32).tolist(), (*where, i)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_numpy_simulation_bit_for_bit(world: int) -> None:
    cases = [(v, t, b) for n, v, t in CASES if n == world for b in ("allgather", "sharded", "server")]
    results = run_ok(_run_cases, world, cases=cases)
    assert_matches_simulation(results, cases, world)
    for c in range(len(cases)):
        # Parameters moved, so the equality above is not between two untouched copies.
        assert not np.array_equal(results[0][c]["params"][0], init_params()[0])


def _stochastic(rank: int, world: int) -> list[dict[str, object]]:
    backends = ("allgather", "sharded", "server")
    return [_train(rank, world, "average", "random", 7, backend=b, binarize="stochastic") for b in backends]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_stochastic_signs_match_simulation_bit_for_bit(world: int) -> None:
    """dlion-sto: every backend's parameters and momenta equal the simulation's, and differ
    from the plain sign's (the random signs are really sent)."""
    results = run_ok(_stochastic, world)
    grads = make_grads(world)
    sim = {"vote": "average", "tie": "random", "seed": 7, "bucket_numel": BUCKET_NUMEL}
    expect, moms = simulate(init_params(), GROUPS, grads, binarize="stochastic", **sim)  # type: ignore[arg-type]
    plain, _ = simulate(init_params(), GROUPS, grads, **sim)  # type: ignore[arg-type]
    for rank in range(world):
        for c, backend in enumerate(("allgather", "sharded", "server")):
            assert_bits_equal(results[rank][c], expect, moms[rank], ("stochastic", backend, rank))
    assert not np.array_equal(expect[0], plain[0])


def test_ties_and_zero_rule_differ_as_documented() -> None:
    """tie='zero' leaves even splits unmoved; tie='random' moves them by +-lr."""
    grads = make_grads(2)
    a, _ = simulate(
        init_params(), GROUPS, grads, vote="majority", tie="zero", seed=7, bucket_numel=BUCKET_NUMEL
    )
    b, _ = simulate(
        init_params(), GROUPS, grads, vote="majority", tie="random", seed=7, bucket_numel=BUCKET_NUMEL
    )
    assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_ledger_matches_cost_model() -> None:
    world = 3
    results = run_ok(_run_cases, world, cases=[("majority", "random", "allgather")])
    from dlion.compress.buckets import plan_buckets

    buckets = plan_buckets([int(np.prod(s)) for s in SHAPES], BUCKET_NUMEL)
    payload = sum(int(np.prod(s)) for s in SHAPES)
    n_tensors = len(SHAPES)
    meta_bytes = 4 + (n_tensors + 7) // 8
    for rank in range(world):
        led = results[rank][0]
        per_step_bits = (world - 1) * 8 * sum(b.nbytes for b in buckets)
        meta_bits = (world - 1) * 8 * meta_bytes
        fp_bits = (world - 1) * 64 * 6
        expect = STEPS * (per_step_bits + meta_bits) + fp_bits
        up = down = start_bits(world, n_tensors)
        assert led["ledger"]["bytes_sent"] * 8 == expect + up
        assert led["ledger"]["bytes_received"] * 8 == expect + down
        assert led["ledger"]["one_off_bytes_sent"] * 8 == up
        sent_payload = led["ledger"]["sent_bytes_by_kind"]["payload"]
        assert sent_payload == STEPS * (world - 1) * payload / 8  # ranks start equal: no broadcast
        assert led["ledger"]["steps"] == STEPS
        # The start broadcast is a one-off, outside the per-step figure.
        assert led["ledger"]["bits_per_param_up"] == pytest.approx(expect / STEPS / payload)
        # one collective per bucket plus the metadata exchange (and the fingerprint once)
        assert [len(s) for s in led["records"]] == [len(buckets) + 2] + [len(buckets) + 1] * (STEPS - 1)


@pytest.mark.parametrize(
    ("world", "vote", "tie", "planes"),
    [(4, "majority", "random", 1), (3, "average", "random", 2), (4, "majority", "zero", 2)],
)
def test_sharded_ledger_matches_cost_model(world: int, vote: str, tie: str, planes: int) -> None:
    from dlion.compress.buckets import plan_buckets

    results = run_ok(_run_cases, world, cases=[(vote, tie, "sharded")])
    buckets = plan_buckets([int(np.prod(s)) for s in SHAPES], BUCKET_NUMEL, 16 * world)
    meta_bits = (world - 1) * 8 * (4 + (len(SHAPES) + 7) // 8)
    bucket_bits = sum(8 * b.nbytes for b in buckets)
    # all_to_all: (N-1)/N S up; result all_gather: (N-1)/N S per result plane.
    per_step = (world - 1) * bucket_bits // world * (1 + planes) + meta_bits
    fp_bits = (world - 1) * 64 * 6
    for rank in range(world):
        led = results[rank][0]["ledger"]
        up = down = start_bits(world, len(SHAPES))
        assert led["bytes_sent"] * 8 == STEPS * per_step + fp_bits + up
        assert led["bytes_received"] * 8 == STEPS * per_step + fp_bits + down
        payload = led["sent_bytes_by_kind"]["payload"] + led["received_bytes_by_kind"]["payload"]
        assert payload > 0


def test_server_ledger_matches_cost_model() -> None:
    from dlion.compress.buckets import plan_buckets

    world = 3
    results = run_ok(_run_cases, world, cases=[("average", "random", "server")])
    buckets = plan_buckets([int(np.prod(s)) for s in SHAPES], BUCKET_NUMEL)
    bucket_bits = sum(8 * b.nbytes for b in buckets)
    planes = 2  # counts of 0..3 votes
    meta = (world - 1) * 8 * (4 + (len(SHAPES) + 7) // 8)
    fp_bits = (world - 1) * 64 * 6
    server = results[0][0]["ledger"]
    up = down = start_bits(world, len(SHAPES))  # all_gathers: received as much as sent
    assert server["bytes_received"] * 8 == STEPS * ((world - 1) * bucket_bits + meta) + fp_bits + down
    assert server["bytes_sent"] * 8 == STEPS * ((world - 1) * planes * bucket_bits + meta) + fp_bits + up
    for rank in range(1, world):
        worker = results[rank][0]["ledger"]
        assert worker["bytes_sent"] * 8 == STEPS * (bucket_bits + meta) + fp_bits + up
        assert worker["bytes_received"] * 8 == STEPS * (planes * bucket_bits + meta) + fp_bits + down
    names = {name for name, _, _ in results[0][0]["records"][1]}
    assert any(name.endswith("[server]") for name in names)


def _cautious(rank: int, world: int) -> list[dict[str, object]]:
    return [
        _train(rank, world, "average", "random", seed=7, backend=b, cautious_wd=True)
        for b in ("allgather", "sharded")
    ]


def test_cautious_weight_decay_matches_simulation_on_every_rank() -> None:
    """The decay mask uses only the voted update and the parameter, both identical on all
    ranks, so ranks stay bit-identical and equal the simulation."""
    world = 3
    results = run_ok(_cautious, world)
    grads = make_grads(world)
    kw = {"vote": "average", "tie": "random", "seed": 7, "bucket_numel": BUCKET_NUMEL}
    expect, _ = simulate(init_params(), GROUPS, grads, cautious=True, **kw)  # type: ignore[arg-type]
    plain, _ = simulate(init_params(), GROUPS, grads, **kw)  # type: ignore[arg-type]
    assert any(not np.array_equal(a, b) for a, b in zip(expect, plain, strict=True))
    for rank in range(world):
        for res in results[rank]:
            for a, b in zip(res["params"], expect, strict=True):  # type: ignore[call-overload]
                assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist()
