"""Deep Gradient Compression: codec, selection, residual, and 2-4 Gloo ranks against a simulation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import dlion
from dlion import wire
from dlion.compress import dgc as codec
from dlion.ledger import CollectiveRecord
from dlion.wire import derive_key
from dlion.worker.baselines.dgc import (
    DGC,
    DGCConfig,
    build_dgc,
    clip_factor,
    momentum_correction,
    momentum_sgd_apply,
    take_sent,
)

from multiproc import run_ok

# ---------------------------------------------------------------- schedule and rules


def test_warmup_schedule_follows_the_paper() -> None:
    kw = {"sparsity": 0.999, "warmup_steps": 20, "warmup_stages": 4}
    dens = [codec.density_at(s, **kw) for s in range(25)]  # type: ignore[arg-type]
    expect = [0.25] * 5 + [0.0625] * 5 + [0.015625] * 5 + [0.00390625] * 5 + [0.001] * 5
    assert dens == expect
    assert sorted({round(1 - d, 8) for d in dens}) == [0.75, 0.9375, 0.984375, 0.99609375, 0.999]
    # No warm-up; and a final sparsity below a stage's is never exceeded.
    assert codec.density_at(0, sparsity=0.999, warmup_steps=0, warmup_stages=4) == 0.001
    assert [codec.density_at(s, sparsity=0.9, warmup_steps=4, warmup_stages=4) for s in range(5)] == [
        0.25,
        0.1,
        0.1,
        0.1,
        0.1,
    ]
    assert codec.select_count(1000, 0.001) == 1 and codec.select_count(1001, 0.001) == 2


def test_which_tensors_are_compressed() -> None:
    assert not codec.is_compressed((4096,))  # biases, norm weights: dense
    assert codec.is_compressed((1, 1)) and codec.is_compressed((64, 3, 3, 3))
    assert not codec.is_compressed((8, 8), min_numel=65)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"momentum": 1.0}, "momentum"),
        ({"sample_ratio": 0.0}, "sample_ratio"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"backend": "sharded"}, "backend"),
        ({"value_dtype": "bfloat16"}, "value_dtype"),
        ({"transport": "nccl"}, "transport"),
        ({"seed": True}, "seed"),
    ],
)
def test_config_names_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DGCConfig(**kwargs)


def test_builder_takes_momentum_from_beta1() -> None:
    opt = build_dgc([torch.nn.Parameter(torch.zeros(3, 3))], lr=0.1, weight_decay=0.0, betas=(0.8, 0.99))
    assert opt.config.momentum == 0.8 and opt.config.backend == "allgather"
    with pytest.raises(ValueError, match="backend"):
        build_dgc(
            [torch.nn.Parameter(torch.zeros(3))], lr=0.1, weight_decay=0.0, betas=(0.9, 0.9), backend="x"
        )
    with pytest.raises(ValueError, match="lr"):
        DGC([torch.nn.Parameter(torch.zeros(3))], lr=-1.0)


# ---------------------------------------------------------------- codec


def _layout(value_dtype: torch.dtype) -> codec.WireLayout:
    # Tensors: compressed (k=5), dense (7), compressed (k=3).
    return codec.plan_wire([100, 7, 30], [5, None, 3], value_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_codec_round_trip(dtype: torch.dtype) -> None:
    layout = _layout(dtype)
    # Slots padded to whole 16-byte words: 8 -> 8 (fp32: multiple of 4; fp16: of 8).
    assert layout.n_slots == 8 and layout.n_dense == 8 and layout.nbytes % 16 == 0
    gen = torch.Generator().manual_seed(0)
    idx = [torch.tensor([3, 17, 42, 64, 99]), torch.tensor([0, 29])]  # the second: 2 of 3 slots
    val = [torch.randn(5, generator=gen), torch.randn(2, generator=gen)]
    dense = [torch.randn(7, generator=gen)]
    msg = codec.encode(layout, idx, val, dense)
    assert msg.dtype == torch.uint8 and msg.numel() == layout.nbytes
    assert codec.valid_slots(layout, msg[None]) == [7]
    out = codec.decode_sum(layout, msg[None])
    expect = torch.zeros(137)
    expect[idx[0]] = val[0].to(dtype).float()
    expect[107 + idx[1]] = val[1].to(dtype).float()
    expect[100:107] = dense[0]
    assert torch.equal(out, expect)
    # The empty slot and the fill slot carry the sentinel.
    ids = msg[: layout.value_offset].view(torch.int32)
    assert ids[7:].tolist() == [codec.SENTINEL]
    # Dense tensors reduced apart: the message shrinks and decodes zeros there.
    apart = codec.plan_wire([100, 7, 30], [5, None, 3], dtype, dense_in_message=False)
    assert apart.n_dense == 0 and apart.nbytes == layout.nbytes - 4 * 8
    out = codec.decode_sum(apart, codec.encode(apart, idx, val, [])[None])
    assert torch.equal(out, torch.cat([expect[:100], torch.zeros(7), expect[107:]]))
    assert apart.dense_ranges() == [(0, 100, 7)]


def test_decode_adds_ranks_in_order() -> None:
    layout = _layout(torch.float32)
    a = codec.encode(
        layout,
        [torch.tensor([1]), torch.tensor([2])],
        [torch.tensor([1.0]), torch.tensor([2.0])],
        [torch.ones(7)],
    )
    b = codec.encode(
        layout,
        [torch.tensor([1]), torch.tensor([])],
        [torch.tensor([0.5]), torch.tensor([])],
        [torch.ones(7)],
    )
    out = codec.decode_sum(layout, torch.stack([a, b]))
    assert out[1] == 1.5 and out[109] == 2.0 and torch.equal(out[100:107], torch.full((7,), 2.0))
    assert codec.valid_slots(layout, torch.stack([a, b])) == [2, 1]


def test_bits_per_element_of_the_wire_format() -> None:
    """65536 elements at 99.9%: k = 66 entries, 64 bits each in fp32 (32 index + 32 value)."""
    d = 65536
    k = codec.sample_plan(d, 0.001, 0.01).k
    assert k == 66
    for dtype, value_bits, slots in ((torch.float32, 32, 68), (torch.float16, 16, 72)):
        layout = codec.plan_wire([d], [k], dtype)
        assert layout.n_slots == slots and layout.nbytes == slots * (4 + value_bits // 8)
        t = codec.message_traffic(layout, k)
        assert t.indices == 32 * k and t.payload == value_bits * k
        assert t.padding == (slots - k) * (32 + value_bits) and t.bits == 8 * layout.nbytes
        assert (t.indices + t.payload) / k == 32 + value_bits
    # Dense tensors: 32 bits of payload per element, zero-padded to a 16-byte word.
    t = codec.message_traffic(codec.plan_wire([5], [None], torch.float32), 0)
    assert (t.payload, t.indices, t.padding) == (160, 0, 96)


# ---------------------------------------------------------------- selection and residual


@pytest.mark.parametrize("density", [0.001, 0.01])
@pytest.mark.parametrize("dist", ["normal", "heavy"])
def test_sampled_threshold_selects_about_k(density: float, dist: str) -> None:
    """Tolerance: the reference's correction keeps 0.8 k .. k entries (more are cut to k).

    Every kept entry is among the ceil(1.3 k) largest, since a pick above 1.3 k is redone
    as an exact top-k. On the wire a tensor always takes exactly k slots.
    """
    n = 200_000
    plan = codec.sample_plan(n, density, 0.01)
    assert plan.stride > 1 and plan.k == math.ceil(n * density)
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n, generator=gen)
        if dist == "heavy":
            x = x * torch.rand(n, generator=gen).pow(-2)  # Pareto-like tails
        idx = codec.select_topk(x, plan, derive_key(seed, wire.SAMPLE_STREAM, 0, 0, 0))
        assert math.ceil(0.8 * plan.k) <= idx.numel() <= plan.k
        assert torch.equal(idx, idx.unique())  # sorted, distinct
        top = set(torch.topk(x.abs(), math.ceil(1.3 * plan.k)).indices.tolist())
        assert set(idx.tolist()) <= top
        layout = codec.plan_wire([n], [plan.k], torch.float32)
        msg = codec.encode(layout, [idx], [x[idx]], [])
        ids = msg[: layout.value_offset].view(torch.int32)[: plan.k]
        assert ids.numel() == plan.k and int((ids >= 0).sum()) == idx.numel()


def test_unsampled_selection_is_the_exact_top_k() -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    plan = codec.sample_plan(5000, 0.01, 1.0)
    assert plan.stride == 1
    idx = codec.select_topk(x, plan, 0)
    assert set(idx.tolist()) == set(torch.topk(x.abs(), 50).indices.tolist())


def test_selection_seeds_are_per_rank_and_reproducible() -> None:
    n = 100_000
    plan = codec.sample_plan(n, 0.001, 0.01)
    x = torch.randn(n, generator=torch.Generator().manual_seed(2))
    keys = {r: derive_key(7, wire.SAMPLE_STREAM, 3, r, 5) for r in range(4)}
    assert len(set(keys.values())) == 4 and len({k % plan.stride for k in keys.values()}) > 1
    for key in keys.values():
        assert torch.equal(codec.select_topk(x, plan, key), codec.select_topk(x, plan, key))


def test_residual_conserves_gradient_mass() -> None:
    """Each step, sent + residual == accumulated velocity exactly (fp32); over steps with
    m = 0 the sent entries plus the final residual add up to the sum of the gradients
    (to fp32 rounding of the sums: atol 1e-4 on sums of about 10 N(0,1) values)."""
    n, steps = 20_000, 10
    plan = codec.sample_plan(n, 0.01, 0.01)
    for momentum in (0.9, 0.0):
        u, v = torch.zeros(n), torch.zeros(n)
        sent_total, grad_total = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        for step in range(steps):
            g = torch.randn(n, generator=torch.Generator().manual_seed(step))
            momentum_correction(u, v, g, momentum)
            before, u_before = v.clone(), u.clone()
            idx = codec.select_topk(v, plan, step)
            sent = take_sent(u, v, idx, masking=True)
            rebuilt = v.clone()
            rebuilt[idx] = sent
            assert torch.equal(rebuilt, before)  # nothing lost, nothing made up
            assert torch.all(u[idx] == 0) and torch.equal(u[v != 0], u_before[v != 0])
            sent_total[idx] += sent.double()
            grad_total += g.double()
        if momentum == 0.0:
            torch.testing.assert_close(sent_total + v.double(), grad_total, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- single process


def _tiny_run(steps: int, split: int | None = None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    cfg = DGCConfig(warmup_steps=4, warmup_stages=2, sparsity=0.99, clip_norm=1.0)
    opt = DGC(model.parameters(), lr=0.05, weight_decay=1e-3, config=cfg)
    gen = torch.Generator().manual_seed(3)
    for step in range(steps):
        if step == split:
            state = opt.state_dict()
            opt = DGC(model.parameters(), lr=0.05, weight_decay=1e-3, config=cfg)
            opt.load_state_dict(state)
        opt.zero_grad()
        model(torch.randn(16, 32, generator=gen)).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_single_process_is_deterministic_and_resumes() -> None:
    a, b, c = _tiny_run(8), _tiny_run(8), _tiny_run(8, split=5)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c, strict=True))


def test_sending_everything_is_momentum_sgd() -> None:
    """At sparsity 0 momentum correction sends u each step: torch.optim.SGD's update
    (paper section 3.1), up to fp32 rounding (weight decay takes its own buffer). Without
    masking only: masking would clear u wherever something was sent, here everywhere."""
    runs = []
    for make in (
        lambda ps: DGC(
            ps,
            lr=0.05,
            weight_decay=1e-2,
            config=DGCConfig(sparsity=0.0, warmup_steps=0, momentum_masking=False),
        ),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    ):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
        opt = make(list(model.parameters()))
        gen = torch.Generator().manual_seed(3)
        for _ in range(10):
            opt.zero_grad()
            model(torch.randn(16, 32, generator=gen)).pow(2).mean().backward()
            opt.step()
        runs.append([p.detach() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_nonfinite_gradient_raises_or_skips() -> None:
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt = DGC([p], lr=0.1)
    p.grad = torch.full((4, 4), float("nan"))
    with pytest.raises(dlion.NonFiniteGradientError, match="rank 0"):
        opt.step()
    opt = DGC([p], lr=0.1, config=DGCConfig(nonfinite="skip"))
    opt.step()
    assert opt.skipped_steps == 1 and torch.equal(p.detach(), torch.ones(4, 4)) and not opt.state


# ---------------------------------------------------------------- N ranks against a simulation

SHAPES = [(64, 64), (64,), (12, 10), (3,), (5, 7)]
STEPS = 6
LR, WD = 0.1, 1e-3
RUN = {"sparsity": 0.99, "warmup_steps": 4, "warmup_stages": 2, "sample_ratio": 0.05, "clip_norm": 5.0}
VARIANTS = {
    "allgather": {"backend": "allgather"},
    "server": {"backend": "server"},
    "fp16": {"backend": "allgather", "value_dtype": "float16"},
}


def _grads(step: int, rank: int) -> list[torch.Tensor | None]:
    rng = np.random.default_rng([step, rank])
    grads: list[torch.Tensor | None] = [
        torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in SHAPES
    ]
    if step == 2 and rank == 1:
        grads[2] = None  # absent on one rank: it sends g = 0
    if step == 3:
        grads[4] = None  # absent everywhere: left alone
    return grads


def _params() -> list[torch.nn.Parameter]:
    rng = np.random.default_rng(99)
    return [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32))) for s in SHAPES]


def _dgc_ranks(rank: int, world: int) -> dict[int, dict[str, Any]]:
    """One spawn of 4 ranks serves N = 2, 3, 4: the first N ranks form a process group."""
    import torch.distributed as dist

    out: dict[int, dict[str, Any]] = {}
    for n in (2, 3, 4):
        group = dist.new_group(list(range(n))) if n < world else None  # every rank joins the call
        if rank >= n:
            continue
        out[n] = {}
        for name, variant in VARIANTS.items():
            params = _params()
            cfg = DGCConfig(seed=5, **RUN, **variant)  # type: ignore[arg-type]
            opt = DGC(params, lr=LR, weight_decay=WD, process_group=group, config=cfg)
            for step in range(STEPS):
                for p, g in zip(params, _grads(step, rank), strict=True):
                    p.grad = g
                opt.step()
            out[n][name] = {"params": [p.detach().clone() for p in params], "steps": opt.ledger.steps}
    return out


def _simulate(world: int, value_dtype: torch.dtype) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Every rank's DGC in one process; 'communication' adds the sent entries in rank order."""
    cfg = DGCConfig(seed=5, **RUN)  # type: ignore[arg-type]
    params = _params()
    u = [[torch.zeros(math.prod(s)) for s in SHAPES] for _ in range(world)]
    v = [[torch.zeros(math.prod(s)) for s in SHAPES] for _ in range(world)]
    buf = [torch.zeros(s) for s in SHAPES]
    info = []
    for step in range(STEPS):
        grads = [_grads(step, r) for r in range(world)]
        live = [t for t in range(len(SHAPES)) if any(grads[r][t] is not None for r in range(world))]
        density = codec.density_at(step, sparsity=0.99, warmup_steps=4, warmup_stages=2)
        total = [torch.zeros(math.prod(s)) for s in SHAPES]
        valid = []
        for r in range(world):
            scale = clip_factor([g for g in grads[r] if g is not None], cfg.clip_norm, world)
            count = 0
            for t in live:
                g = grads[r][t]
                flat = torch.zeros(math.prod(SHAPES[t])) if g is None else g.reshape(-1) * scale
                if len(SHAPES[t]) == 1:
                    total[t] += flat
                    continue
                momentum_correction(u[r][t], v[r][t], flat, cfg.momentum)
                plan = codec.sample_plan(flat.numel(), density, cfg.sample_ratio)
                idx = codec.select_topk(v[r][t], plan, derive_key(5, wire.SAMPLE_STREAM, step, r, t))
                sent = take_sent(u[r][t], v[r][t], idx, masking=True)
                total[t][idx] += sent.to(value_dtype).float()
                count += idx.numel()
            valid.append(count)
        for t in live:
            avg = (total[t] / world).view(SHAPES[t])
            momentum_sgd_apply(
                params[t],
                avg,
                buf[t],
                lr=LR,
                weight_decay=WD,
                momentum=cfg.momentum,
                corrected=len(SHAPES[t]) > 1,
            )
        ks = [
            None if len(SHAPES[t]) == 1 else codec.select_count(math.prod(SHAPES[t]), density) for t in live
        ]
        numels = [math.prod(SHAPES[t]) for t in live]
        layouts = {
            "allgather": codec.plan_wire(numels, ks, value_dtype, dense_in_message=False),
            "server": codec.plan_wire(numels, ks, value_dtype),
        }
        info.append({"layouts": layouts, "valid": valid})
    return [p.detach() for p in params], info


def _bits(recs: list[CollectiveRecord], names: set[str], way: str) -> int:
    return sum(getattr(r, way).bits for r in recs if r.name in names)


def _check_ledger(
    steps: list[list[CollectiveRecord]], info: list[dict[str, Any]], rank: int, world: int, backend: str
) -> None:
    """The ledger equals docs/design.md's cost model applied to the message sizes."""
    n = world
    meta = 8 * (4 + 1)  # bad index + presence bits of 5 tensors
    for step, (recs, inf) in enumerate(zip(steps, info, strict=True)):
        layout, valid = inf["layouts"][backend], inf["valid"]
        assert _bits(recs, {"meta"}, "sent") == _bits(recs, {"meta"}, "received") == (n - 1) * meta
        assert _bits(recs, {"fingerprint"}, "sent") == (n - 1) * 6 * 64 * (step == 0)
        msg = 8 * layout.nbytes
        others = [codec.message_traffic(layout, c) for j, c in enumerate(valid) if j != rank]
        if backend == "allgather":
            assert _bits(recs, {"dgc"}, "sent") == _bits(recs, {"dgc"}, "received") == (n - 1) * msg
            got = next(r.received for r in recs if r.name == "dgc")
            assert got.indices == sum(o.indices for o in others) and got.payload == sum(
                o.payload for o in others
            )
            # Dense tensors: ring all_reduce's 2 (N-1)/N of the buffer each way, 16-byte shards.
            dense = 32 * n * -(-layout.dense_numel // (4 * n)) * 4
            assert dense * 2 * (n - 1) % n == 0
            assert _bits(recs, {"dgc.dense"}, "sent") == _bits(recs, {"dgc.dense"}, "received")
            assert _bits(recs, {"dgc.dense"}, "sent") == dense * 2 * (n - 1) // n
            continue
        down = 32 * (-(-layout.total_numel // 4) * 4)
        names = {"dgc", "dgc[server]"}
        if rank == 0:  # the server: N-1 messages in, N-1 dense results out
            assert (
                _bits(recs, names, "received") == (n - 1) * msg
                and _bits(recs, names, "sent") == (n - 1) * down
            )
            assert next(r.received for r in recs if r.op == "gather").indices == sum(
                o.indices for o in others
            )
        else:
            assert _bits(recs, names, "sent") == msg and _bits(recs, names, "received") == down
            assert next(r.sent for r in recs if r.op == "gather").indices == 32 * valid[rank]


def test_distributed_equals_simulation() -> None:
    """2, 3 and 4 Gloo ranks, three variants each, bit for bit against the simulation."""
    results = run_ok(_dgc_ranks, 4)
    for world in (2, 3, 4):
        ranks = [res[world] for res in results[:world]]
        for name, value_dtype in (("allgather", torch.float32), ("fp16", torch.float16)):
            expect, info = _simulate(world, value_dtype)
            for rank, res in enumerate(ranks):
                for got, want in zip(res[name]["params"], expect, strict=True):
                    assert torch.equal(got, want), (world, name, rank)
                _check_ledger(res[name]["steps"], info, rank, world, "allgather")
        _, info = _simulate(world, torch.float32)
        for rank, res in enumerate(ranks):
            # The server's dense broadcast carries the same average: the same bits as allgather.
            for got, want in zip(res["server"]["params"], res["allgather"]["params"], strict=True):
                assert torch.equal(got, want), (world, rank)
            _check_ledger(res["server"]["steps"], info, rank, world, "server")


def test_decode_refuses_an_index_past_its_tensor() -> None:
    """A corrupt index would add into the next tensor: the message is refused, naming the rank."""
    layout = _layout(torch.float32)
    good = codec.encode(layout, [torch.tensor([99]), torch.tensor([29])], [torch.ones(1), torch.ones(1)],
                        [torch.ones(7)])  # fmt: skip
    bad = good.clone()
    ids = bad[: layout.value_offset].view(torch.int32)
    ids[0] = 100  # tensor 0 has 100 elements: its indices run 0..99
    assert codec.decode_sum(layout, torch.stack([good, good]))[99] == 2.0
    with pytest.raises(ValueError, match="DGC message from rank 1: slot 0 holds index 100, past its"):
        codec.decode_sum(layout, torch.stack([good, bad]))
