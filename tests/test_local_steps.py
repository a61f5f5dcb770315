"""dlion-local (H local Lion steps, then a sign vote of the pseudo-gradients) on 2-4 Gloo ranks
against the single-process NumPy simulation (tests/sim_local.py), bit for bit; DiLoCo against
N torch workers in one process."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from sim_local import Rounds, simulate_local

from multiproc import run_ok
from sim import Group

SHAPES = [(7,), (3, 5), (33,), (4, 4, 3), (1,), (130,)]
BUCKET_NUMEL = 128
STEPS = 11  # H = 5: two whole rounds and a partial one, ended by sync()
GROUPS = [
    Group([0, 1, 2], lr=0.01, weight_decay=0.1, betas=(0.8, 0.9)),
    Group([3, 4, 5], lr=0.003, weight_decay=0.0, betas=(0.8, 0.9)),
]


def make_grads(world: int, steps: int = STEPS) -> list[list[list[np.ndarray | None]]]:
    """[step][rank][tensor]: exact zeros on step 0 (c == 0), tensor 2 absent on the last rank at
    step 1, tensor 4 absent everywhere (it never moves)."""
    out: list[list[list[np.ndarray | None]]] = []
    for step in range(steps):
        per_rank: list[list[np.ndarray | None]] = []
        for rank in range(world):
            rng = np.random.default_rng([3, step, rank])
            grads: list[np.ndarray | None] = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
            if step == 0:
                for g in grads:
                    assert g is not None
                    g.reshape(-1)[::3] = 0.0
            if step == 1 and rank == world - 1:
                grads[2] = None
            grads[4] = None
            per_rank.append(grads)
        out.append(per_rank)
    return out


def init_params() -> list[np.ndarray]:
    rng = np.random.default_rng(99)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def _groups(params: list[torch.nn.Parameter]) -> list[dict[str, object]]:
    return [
        {
            "params": [params[i] for i in g.indices],
            "lr": g.lr,
            "weight_decay": g.weight_decay,
            "betas": g.betas,
        }
        for g in GROUPS
    ]


def _local(
    params: list[torch.nn.Parameter], rounds: Rounds, vote: str, backend: str, **outer: object
) -> object:
    from dlion.worker.lion.config import DistributedLionConfig
    from dlion.worker.local.build import local_lion
    from dlion.worker.local.config import LocalStepsConfig

    local = LocalStepsConfig(
        local_steps=rounds.local_steps, outer_lr=rounds.outer_lr, error_feedback=rounds.error_feedback
    )
    config = DistributedLionConfig(vote=vote, backend=backend, seed=7, bucket_numel=BUCKET_NUMEL, **outer)  # type: ignore[arg-type]
    return local_lion(
        _groups(params), lr=1.0, betas=(0.8, 0.9), weight_decay=0.0, local=local, outer=config,
        outer_momentum=rounds.outer_momentum,
    )  # fmt: skip


def _feed(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], rank: int, grads: list, steps: range
) -> None:
    for step in steps:
        for p, g in zip(params, grads[step][rank], strict=True):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()


def _run(rank: int, world: int, cases: list[tuple[Rounds, str, str]]) -> list[list[np.ndarray]]:
    out = []
    grads = make_grads(world)
    for rounds, vote, backend in cases:
        params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
        opt = _local(params, rounds, vote, backend)
        _feed(opt, params, rank, grads, range(STEPS))
        opt.sync()  # type: ignore[attr-defined]
        out.append([p.detach().numpy().copy() for p in params])
    return out


def _cases(world: int) -> list[tuple[Rounds, str, str]]:
    """Both votes, error feedback and outer momentum on and off, H = 1, 2 and 5, three
    backends taking turns (each meets every H and both votes)."""
    combos = itertools.product(("majority", "average"), (False, True), (0.0, 0.9), (1, 2, 5))
    return [
        (
            Rounds(h, outer_lr=1.5 if h > 1 else 1.0, outer_momentum=mom, error_feedback=ef),
            vote,
            ("allgather", "sharded", "server")[(k + k // 3) % 3],
        )
        for k, (vote, ef, mom, h) in enumerate(combos)
    ]


def assert_bits(got: list[np.ndarray], expect: list[np.ndarray], where: object) -> None:
    for i, (a, b) in enumerate(zip(got, expect, strict=True)):
        assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist(), (where, i)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_matches_simulation_bit_for_bit(world: int) -> None:
    cases = _cases(world)
    results = run_ok(_run, world, cases=cases)
    grads = make_grads(world)
    for c, (rounds, vote, backend) in enumerate(cases):
        expect, _ = simulate_local(
            init_params(), GROUPS, grads, rounds, vote=vote, seed=7, bucket_numel=BUCKET_NUMEL
        )
        for rank in range(world):
            assert_bits(results[rank][c], expect, (rounds, vote, backend, rank))
        moved = [not np.array_equal(a, b) for a, b in zip(expect, init_params(), strict=True)]
        assert moved == [True, True, True, True, False, True], (rounds, vote)  # tensor 4 never had a gradient


def _h1_pair(rank: int, world: int, backend: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """dlion-mavo and dlion-local at H = 1 (inner Lion, outer lr = inner lr, no outer momentum,
    no error feedback), on gradients every rank holds for every tensor, weight decay on."""
    import dlion

    grads = [
        [
            [g if g is not None else np.ones(s, np.float32) for g, s in zip(gs, SHAPES, strict=True)]
            for gs in step
        ]
        for step in make_grads(world)
    ]
    out = []
    for which in ("mavo", "local"):
        params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
        if which == "mavo":
            opt: torch.optim.Optimizer = dlion.DistributedLion(
                _groups(params), vote="majority", backend=backend, seed=7, bucket_numel=BUCKET_NUMEL
            )
        else:
            opt = _local(params, Rounds(1), "majority", backend)
        _feed(opt, params, rank, grads, range(STEPS))
        out.append([p.detach().numpy().copy() for p in params])
    return out[0], out[1]


@pytest.mark.parametrize(("world", "backend"), [(2, "sharded"), (3, "allgather")])
def test_one_local_step_is_dlion_mavo_bit_for_bit(world: int, backend: str) -> None:
    for rank, (mavo, local) in enumerate(run_ok(_h1_pair, world, backend=backend)):
        assert_bits(local, mavo, rank)
        assert not np.array_equal(mavo[0], init_params()[0])


def _ledger(rank: int, world: int) -> dict[str, object]:
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    opt = _local(params, Rounds(5), "majority", "allgather")
    _feed(opt, params, rank, make_grads(world), range(STEPS))
    return {
        "summary": opt.ledger.summary(),
        "records": [len(r) for r in opt.ledger.steps],
        "steps": opt.ledger.step_bytes(),
    }  # type: ignore[attr-defined]


def test_ledger_counts_inner_steps_and_matches_the_cost_model_each_round() -> None:
    """allgather at N = 3, H = 5: nothing in the inner steps; at each round's end the metadata
    and each bucket's bits, as dlion-mavo's step; the fingerprint once; bits per parameter per
    step over all 11 steps."""
    from dlion.compress.buckets import plan_buckets

    from sim import start_bits

    world = 3
    results = run_ok(_ledger, world)
    buckets = plan_buckets([int(np.prod(s)) for s in SHAPES], BUCKET_NUMEL)
    live = [b for b in buckets if any(s.index != 4 for s in b.slots)]
    round_bits = (world - 1) * 8 * (sum(b.nbytes for b in live) + 4 + (len(SHAPES) + 7) // 8)
    fingerprint = (world - 1) * 64 * 6
    n_params = sum(int(np.prod(s)) for s in SHAPES)
    for got in results:
        step_bits = [8 * sent for sent, _ in got["steps"]]
        expect = [0] * STEPS
        expect[4], expect[9] = round_bits + fingerprint, round_bits
        assert step_bits == expect
        s = got["summary"]
        assert s["steps"] == STEPS
        assert s["bits_per_param_up"] == pytest.approx(sum(expect) / STEPS / n_params)
        assert s["one_off_bytes_sent"] * 8 == start_bits(world, len(SHAPES))


def _nan_round(rank: int, world: int, nonfinite: str) -> dict[str, object]:
    """H = 3; rank 1's gradient of tensor 3 is NaN at step 4 (inside the second round)."""
    from dlion.worker.core.checks import NonFiniteGradientError

    grads = make_grads(world, steps=9)
    grads[4][1][3] = np.full(SHAPES[3], np.nan, np.float32)
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    opt = _local(params, Rounds(3), "majority", "sharded", nonfinite=nonfinite)
    seen: dict[str, object] = {}
    for step in range(9):
        for p, g in zip(params, grads[step][rank], strict=True):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        try:
            opt.step()
        except NonFiniteGradientError as e:
            return {"error": str(e), "step": step}
        seen[f"after{step}"] = [p.detach().numpy().copy() for p in params]
    return {"seen": seen, "skipped": opt.outer.skipped_steps, "rounds": opt.rounds}  # type: ignore[attr-defined]


def test_nan_during_inner_steps_skips_the_round_on_every_rank() -> None:
    results = run_ok(_nan_round, 3, nonfinite="skip")
    for got in results:
        seen = got["seen"]
        assert got["skipped"] == 1 and got["rounds"] == 3
        assert_bits(seen["after5"], seen["after2"], "the skipped round leaves the anchor")
        assert not np.array_equal(seen["after8"][0], seen["after5"][0])  # the next round moves
        assert all(np.isfinite(p).all() for p in seen["after8"])
    for got in results[1:]:
        assert_bits(got["seen"]["after8"], results[0]["seen"]["after8"], "ranks equal")


def test_nan_during_inner_steps_raises_on_every_rank_at_the_round_end() -> None:
    for got in run_ok(_nan_round, 3, nonfinite="raise"):
        assert got["step"] == 5
        assert "rank 1" in got["error"] and "round 1 of 3 local steps" in got["error"]


def _resume(rank: int, world: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """H = 5 with error feedback and outer momentum: 11 steps straight, against 7 steps, a
    state_dict (in the middle of the second round), a fresh optimizer loading it, 4 more."""
    grads = make_grads(world)
    rounds = Rounds(5, outer_lr=2.0, outer_momentum=0.9, error_feedback=True)
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    opt = _local(params, rounds, "average", "sharded")
    _feed(opt, params, rank, grads, range(STEPS))
    opt.sync()  # type: ignore[attr-defined]
    straight = [p.detach().numpy().copy() for p in params]
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    opt = _local(params, rounds, "average", "sharded")
    _feed(opt, params, rank, grads, range(7))
    saved = opt.state_dict()
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]  # a new process's model
    opt = _local(params, rounds, "average", "sharded")
    opt.load_state_dict(saved)
    _feed(opt, params, rank, grads, range(7, STEPS))
    opt.sync()  # type: ignore[attr-defined]
    return straight, [p.detach().numpy().copy() for p in params]


def test_resume_in_the_middle_of_a_round_equals_the_unbroken_run() -> None:
    for rank, (straight, resumed) in enumerate(run_ok(_resume, 2)):
        assert_bits(resumed, straight, rank)


def test_consensus_shows_the_anchor_and_gives_the_rank_its_own_parameters_back() -> None:
    import dlion

    model = torch.nn.Linear(4, 3)
    opt = dlion.build_optimizer("dlion-local", model.parameters(), lr=0.01, weight_decay=0.0, local_steps=4)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
    mine = [p.detach().clone() for p in model.parameters()]
    assert not torch.equal(mine[0], start[0])
    with opt.consensus():
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start, strict=True))
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), mine, strict=True))


def test_outer_lr_follows_the_inner_schedule() -> None:
    """A scheduler on the optimizer moves the inner lr; the outer sign step is outer_lr times it
    (dlion-local), DiLoCo's outer lr stays its own."""
    import dlion

    for name, expect in (("dlion-local", lambda lr: 3.0 * lr), ("diloco", lambda lr: 0.7)):
        model = torch.nn.Linear(4, 3)
        opt = dlion.build_optimizer(
            name,
            model.parameters(),
            lr=0.01,
            weight_decay=0.0,
            local_steps=2,
            outer_lr=None if name == "diloco" else 3.0,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        for _ in range(4):
            model(torch.randn(8, 4)).sum().backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            opt.zero_grad()
            sched.step()
        assert opt.outer.param_groups[0]["lr"] == pytest.approx(expect(lr)), name


def test_grad_scaler_and_mismatched_parts_are_refused() -> None:
    import dlion
    from dlion.worker.core.lion import Lion
    from dlion.worker.local.config import LocalStepsConfig
    from dlion.worker.local.optimizer import LocalSteps

    model = torch.nn.Linear(4, 3)
    opt = dlion.build_optimizer("dlion-local", model.parameters(), lr=0.01, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    with pytest.raises(ValueError, match="GradScaler"):
        scaler.step(opt)
    other = torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="same tensors"):
        LocalSteps(Lion(other.parameters()), dlion.DistributedLion(model.parameters()), LocalStepsConfig())
    with pytest.raises(ValueError, match="local_steps"):
        LocalStepsConfig(local_steps=0)
    with pytest.raises(ValueError, match="outer_lr"):
        dlion.build_optimizer("dlion-local", model.parameters(), lr=0.01, weight_decay=0.0, outer_lr=-1.0)
    with pytest.raises(ValueError, match="error_feedback"):
        dlion.build_optimizer("diloco", model.parameters(), lr=0.01, weight_decay=0.0, error_feedback=True)


def _ddp_local(rank: int, world: int) -> dict[str, object]:
    """dlion-local (H = 2) on a DDP model under dlion.attach, against the same optimizer on the
    bare model: equal bits; the inner steps' gradients stay each rank's own."""
    import dlion

    out: dict[str, object] = {}
    for how in ("bare", "ddp"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        net = torch.nn.parallel.DistributedDataParallel(model) if how == "ddp" else model
        opt = dlion.build_optimizer(
            "dlion-local", model.parameters(), lr=0.01, weight_decay=0.1, local_steps=2
        )
        if how == "ddp":
            dlion.attach(net, opt)
        g = torch.Generator().manual_seed(50 + rank)
        for step in range(5):
            net(torch.randn(4, 6, generator=g)).square().mean().backward()
            if step == 0:
                out[f"{how}_grad"] = model[0].weight.grad.clone()  # type: ignore[union-attr]
            opt.step()
            opt.zero_grad()
        opt.sync()
        out[how] = [p.detach().clone() for p in model.parameters()]
    return out


def test_attach_under_ddp_keeps_each_ranks_gradient_and_equals_the_bare_run() -> None:
    ranks = run_ok(_ddp_local, 2)
    for r in ranks:
        assert all(torch.equal(a, b) for a, b in zip(r["ddp"], r["bare"], strict=True))
        assert torch.equal(r["ddp_grad"], r["bare_grad"])  # DDP did not average it
    assert not torch.equal(ranks[0]["ddp_grad"], ranks[1]["ddp_grad"])
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["ddp"], ranks[1]["ddp"], strict=True))


def _hierarchical(rank: int, world: int) -> list[np.ndarray]:
    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    opt = _local(params, Rounds(3, outer_lr=2.0), "majority", "hierarchical", procs_per_node=2)
    _feed(opt, params, rank, make_grads(world), range(STEPS))
    opt.sync()  # type: ignore[attr-defined]
    return [p.detach().numpy().copy() for p in params]


def test_the_hierarchical_backend_votes_the_nodes_mean_pseudo_gradients() -> None:
    """2 nodes of 2: every rank ends with the same parameters, moved by at most one outer step
    of 2 x lr per round (4 rounds) and the decay."""
    ranks = run_ok(_hierarchical, 4)
    for got in ranks[1:]:
        assert_bits(got, ranks[0], "ranks equal")
    for i, (a, b) in enumerate(zip(ranks[0], init_params(), strict=True)):
        lr = GROUPS[0].lr if i in GROUPS[0].indices else GROUPS[1].lr
        step = np.abs(a - b)
        assert step.max() <= 4 * 2 * lr * (1 + np.abs(b).max()) + 1e-6, i
        assert (step > 0).any() == (i != 4), i
