"""DiLoCo (diloco: inner AdamW, outer Nesterov SGD on the fp32 all-reduced pseudo-gradient)
against N AdamW workers in one process, and against torchft's own DiLoCo, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_local_steps import _feed, init_params, make_grads

from multiproc import run_ok


def _diloco_reference(world: int, h: int, steps: int) -> list[torch.Tensor]:
    """DiLoCo in one process: ``world`` AdamW workers, every ``h`` steps the mean of their
    pseudo-gradients (summed in rank order) into Nesterov SGD on the shared parameters."""
    grads = make_grads(world, steps)
    anchor = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    outer = torch.optim.SGD(anchor, lr=0.7, momentum=0.9, nesterov=True)
    workers = [[torch.nn.Parameter(a.detach().clone()) for a in anchor] for _ in range(world)]
    inner = [torch.optim.AdamW(w, lr=0.01, betas=(0.9, 0.999), weight_decay=0.1) for w in workers]
    for step in range(steps):
        for r in range(world):
            for p, g in zip(workers[r], grads[step][r], strict=True):
                p.grad = None if g is None else torch.from_numpy(g.copy())
            inner[r].step()
        if (step + 1) % h:
            continue
        for i, a in enumerate(anchor):
            total = torch.zeros_like(a)
            for r in range(world):
                total += a.detach() - workers[r][i].detach()
            a.grad = total / world
        outer.step()
        for w in workers:
            for p, a in zip(w, anchor, strict=True):
                p.data.copy_(a.detach())
    return [a.detach().clone() for a in anchor]


def _diloco(rank: int, world: int, h: int, steps: int) -> list[np.ndarray]:
    import dlion

    params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    opt = dlion.build_optimizer("diloco", params, lr=0.01, weight_decay=0.1, local_steps=h)
    _feed(opt, params, rank, make_grads(world, steps), range(steps))
    return [p.detach().numpy().copy() for p in params]


@pytest.mark.parametrize("world", [2, 3])
def test_diloco_matches_n_adamw_workers_in_one_process(world: int) -> None:
    """At N = 2 the fp32 sum is exact whatever its order: bit for bit; at N = 3 Gloo's ring
    adds in another order than the reference, so to float32 rounding."""
    expect = _diloco_reference(world, 3, 9)
    for got in run_ok(_diloco, world, h=3, steps=9):
        for a, b in zip(got, expect, strict=True):
            if world == 2:
                assert a.view(np.uint32).tolist() == b.numpy().view(np.uint32).tolist()
            else:
                np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-6)
        assert not np.array_equal(got[0], init_params()[0])


# torchft 0.2.0's DiLoCo (torchft.local_sgd.DiLoCo, 2 Gloo replicas, its Manager replaced by a
# fixed world of 2 whose allreduce sums and divides by 2), run by bench/torchft_diloco.py in a
# separate environment with torchft installed: nn.Linear(4, 3) from seed 0, rank r's one batch
# from seed 1000 + r, MSE, inner AdamW lr 1e-2 (weight decay 0.01), outer SGD lr 0.7, Nesterov
# momentum 0.9, sync_every 2, 6 steps. Its final parameters' float32 bits:
TORCHFT_WEIGHT = " ".join(
    (
        "3ddbcfb5 3e892b3f be993324 be828bc7",
        "be07c459 3cbfa5d1 bc22c576 3e9166a4",
        "bd364648 3ca5d5ed bd22ffe6 be550e30",
    )
)
TORCHFT_BIAS = "bebd7f72 be5f9921 be541dd8"


def _torchft_setup(rank: int, world: int) -> list[str]:
    import dlion

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    g = torch.Generator().manual_seed(1000 + rank)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g)
    opt = dlion.build_optimizer("diloco", model.parameters(), lr=1e-2, weight_decay=0.01, local_steps=2)
    for _ in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [
        " ".join(f"{v:08x}" for v in p.detach().numpy().reshape(-1).view(np.uint32))
        for p in model.parameters()
    ]


def test_diloco_equals_torchfts_bit_for_bit() -> None:
    for got in run_ok(_torchft_setup, 2):
        assert got == [TORCHFT_WEIGHT, TORCHFT_BIAS]
