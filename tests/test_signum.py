"""signum-mavo: Signum with majority vote (Bernstein et al., ICLR 2019), checked against the
paper's Algorithm 1 written out in torch, on 3 Gloo ranks and on every backend."""

from __future__ import annotations

import numpy as np
import torch

from multiproc import run_ok

SIZES = (37, 300, 5)
STEPS, LR, WD, BETA = 4, 0.01, 0.2, 0.9
BACKENDS = ("allgather", "sharded", "server")


def _grad(step: int, rank: int) -> list[torch.Tensor]:
    rng = np.random.default_rng([step, rank, 11])
    return [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in SIZES]


def _init() -> list[torch.Tensor]:
    rng = np.random.default_rng(3)
    return [torch.from_numpy(rng.standard_normal(n).astype(np.float32)) for n in SIZES]


def _run(rank: int, world: int) -> dict[str, list[torch.Tensor]]:
    from dlion.worker.catalogue import build_optimizer

    out = {}
    for backend in BACKENDS:
        params = [torch.nn.Parameter(t) for t in _init()]
        # betas[1] is ignored: Signum has one momentum coefficient.
        opt = build_optimizer(
            "signum-mavo", params, lr=LR, weight_decay=WD, betas=(BETA, 0.5), backend=backend
        )
        for step in range(STEPS):
            for p, g in zip(params, _grad(step, rank), strict=True):
                p.grad = g
            opt.step()
        out[backend] = [p.detach().clone() for p in params]
    return out


def _algorithm_1(world: int) -> list[torch.Tensor]:
    """Workers: v <- b v + (1-b) g, push sign(v); server: V = sign(sum of signs); all:
    x <- x - lr (V + wd x), the decay written as x (1 - lr wd) as Lion rounds it."""
    x = _init()
    v = [[torch.zeros(n) for n in SIZES] for _ in range(world)]
    for step in range(STEPS):
        for i in range(len(SIZES)):
            votes = torch.zeros(SIZES[i])
            for r in range(world):
                v[r][i] = v[r][i] * BETA + _grad(step, r)[i] * (1 - BETA)
                votes += torch.sign(v[r][i])
            x[i] = x[i] * (1 - LR * WD) - torch.sign(votes) * LR
    return x


def test_signum_majority_vote_is_algorithm_1() -> None:
    world = 3  # odd: no even splits, so the vote is exactly sign(sum)
    results = run_ok(_run, world)
    expect = _algorithm_1(world)
    for by_backend in results:
        assert set(by_backend) == set(BACKENDS)
        for backend, params in by_backend.items():
            for got, want in zip(params, expect, strict=True):
                assert torch.equal(got, want), backend
