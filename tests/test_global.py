"""The fp32 all-reduce baseline against a single-process reference, and forced comm at N=1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dlion
from dlion.worker.catalogue import build_optimizer

from multiproc import run_ok
from sim import start_bits

SHAPES = [(5, 3), (7,), (2, 2, 2)]


def _grads(step: int, rank: int) -> list[torch.Tensor]:
    rng = np.random.default_rng([step, rank])
    return [torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]


def _params() -> list[torch.nn.Parameter]:
    rng = np.random.default_rng(99)
    return [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32))) for s in SHAPES]


def _global_run(rank: int, world: int, name: str) -> dict[str, object]:
    params = _params()
    opt = build_optimizer(name, params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    for step in range(3):
        for p, g in zip(params, _grads(step, rank), strict=True):
            p.grad = g
        opt.step()
    return {"params": [p.detach().clone() for p in params], "ledger": opt.ledger.summary()}


def _reference(name: str, world: int) -> list[torch.Tensor]:
    params = _params()
    inner = torch.optim.AdamW if name == "adamw-global" else dlion.Lion
    opt = inner(params, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    for step in range(3):
        for i, p in enumerate(params):
            # Two ranks: (a + b) / 2 has one rounding whatever the reduction order.
            p.grad = sum(_grads(step, r)[i] for r in range(world)) / world  # type: ignore[assignment]
        opt.step()
    return [p.detach() for p in params]


def test_global_baselines_match_single_process() -> None:
    for name in ("adamw-global", "lion-global"):
        results = run_ok(_global_run, 2, name=name)
        expect = _reference(name, 2)
        numel = sum(int(np.prod(s)) for s in SHAPES)
        padded = -(-numel // 2) * 2
        for res in results:
            for a, b in zip(res["params"], expect, strict=True):  # type: ignore[call-overload]
                assert torch.equal(a, b), name
            led = res["ledger"]
            meta_bits = 8 * (4 + 1)  # bad index + presence bits of 3 tensors, one per peer
            fingerprint = 64 * 6  # the first step's 6 int64, one peer
            up = start_bits(2, len(SHAPES))  # fingerprint and checksums: the ranks start equal
            expect_bits = 3 * (2 * (2 - 1) * 32 * padded // 2 + meta_bits) + fingerprint + up
            assert led["bytes_sent"] * 8 == expect_bits and led["one_off_bytes_sent"] * 8 == up
            assert led["bits_per_param_up"] > 32  # ring all-reduce of fp32 is ~2(N-1)/N * 32 bits


def _forced(rank: int, world: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 6)
    opt = dlion.DistributedLion(model.parameters(), lr=1e-2, weight_decay=0.1, force_comm=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(5, 20, generator=gen)).pow(2).sum().backward()
        opt.step()
    assert len(opt.ledger.steps) == 4
    return [p.detach().clone() for p in model.parameters()]


def test_forced_comm_at_world_size_one_equals_lion() -> None:
    (got,) = run_ok(_forced, 1)
    torch.manual_seed(0)
    model = torch.nn.Linear(20, 6)
    opt = dlion.Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(5, 20, generator=gen)).pow(2).sum().backward()
        opt.step()
    for a, b in zip(got, model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_all_reduce_traffic_at_any_world_size() -> None:
    """Payload and padding need not split into N chunks each; their sum does."""
    from dlion.ledger import Traffic, all_reduce_traffic

    # 10 payload elements + 2 padding = 12 fp32 elements over 3 ranks: 4 per chunk.
    sent, received = all_reduce_traffic(Traffic(payload=32 * 10, padding=32 * 2), 3)
    assert sent == received and sent.bits == 2 * 2 * 32 * 12 // 3
    assert sent.padding == 2 * 2 * 32 * 2 // 3 and sent.payload == sent.bits - sent.padding
    with pytest.raises(ValueError, match="does not split into 3 whole chunks"):
        all_reduce_traffic(Traffic(payload=32 * 10), 3)


def _three_rank_run(rank: int, world: int) -> dict[str, object]:
    p = torch.nn.Parameter(torch.zeros(31))  # 31 does not split into 3 chunks
    opt = build_optimizer("lion-global", [p], lr=1e-2, weight_decay=0.0)
    for step in range(2):
        p.grad = torch.from_numpy(np.random.default_rng([step, rank]).standard_normal(31).astype(np.float32))
        opt.step()
    return {"param": p.detach().clone(), "ledger": opt.ledger.summary()}


def test_global_baseline_at_three_ranks() -> None:
    """The gradient buffer is padded to 33 elements so the ring's 3 chunks are whole."""
    results = run_ok(_three_rank_run, 3)
    for res in results:
        assert torch.equal(res["param"], results[0]["param"])  # type: ignore[arg-type]
        led = res["ledger"]
        meta_bits = 2 * 8 * (4 + 1)
        fingerprint = 2 * 64 * 6  # the first step's 6 int64 to each of 2 peers
        up = start_bits(3, 1)
        assert led["bytes_sent"] * 8 == 2 * (2 * 2 * 32 * 33 // 3 + meta_bits) + fingerprint + up  # type: ignore[index]
        padding_bits = 2 * (2 * 2 * 32 * 2 // 3)  # nothing broadcast: the ranks start equal
        assert led["sent_bytes_by_kind"]["padding"] == padding_bits // 8  # type: ignore[index]
