"""dlion-sto's stochastic sign step: the Numba kernel and the torch ops equal the NumPy
reference bit for bit, and the signs are unbiased for the clipped direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlion.compress.sign_ops import stochastic_sign_step_torch
from dlion.kernels.stochastic import stochastic_sign_step, stochastic_sign_step_ref
from dlion.worker.catalogue import build_optimizer


def _case(n: int, seed: int, zeros: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([n, seed])
    g = rng.standard_normal(n).astype(np.float32)
    m = (0.1 * rng.standard_normal(n)).astype(np.float32)
    if zeros:  # exact zeros in c, and (n = 3) a c that is zero everywhere
        g[::3], m[::3] = 0.0, 0.0
        if n == 3:
            g[:], m[:] = 0.0, 0.0
    return g, m


@pytest.mark.parametrize("n", [1, 3, 8, 13, 4096, 200_003])
@pytest.mark.parametrize("zeros", [False, True])
def test_kernel_and_torch_ops_equal_the_reference(n: int, zeros: bool) -> None:
    g, m = _case(n, 0, zeros)
    m_ref, out_ref = m.copy(), np.zeros((n + 7) // 8, np.uint8)
    stochastic_sign_step_ref(g, m_ref, out_ref, 0.8, 0.9, 12345)
    m_fast, out_fast = m.copy(), np.zeros_like(out_ref)
    stochastic_sign_step(g, m_fast, out_fast, 0.8, 0.9, 12345)
    m_t, out_t = torch.from_numpy(m.copy()), torch.zeros(out_ref.size, dtype=torch.uint8)
    stochastic_sign_step_torch(torch.from_numpy(g), m_t, out_t, 0.8, 0.9, 12345)
    for out, mom in ((out_fast, m_fast), (out_t.numpy(), m_t.numpy())):
        assert out.tolist() == out_ref.tolist()
        assert mom.view(np.uint32).tolist() == m_ref.view(np.uint32).tolist()
    # Momentum moves as Lion's does: b2*m + (1-b2)*g.
    np.testing.assert_array_equal(m_ref, np.float32(0.9) * m + np.float32(0.1) * g)


def test_signs_are_unbiased_for_the_clipped_direction() -> None:
    # c = (1-b1)*g with m = 0 and b1 = 0: the direction is g itself; mean|c| = 1.
    c = np.array([0.05, -0.2, 0.5, -0.9, 1.0, 3.0, -7.0, 0.0, 0.3, -0.3], np.float32)
    c = c / np.abs(c).mean()
    expect = np.clip(c / np.abs(c).mean(), -1, 1)
    draws = 20_000
    total = np.zeros(c.size)
    for key in range(draws):
        out = np.zeros(2, np.uint8)
        stochastic_sign_step(c, np.zeros_like(c), out, 0.0, 0.9, key * 1_000_003)
        total += np.unpackbits(out, count=c.size) * 2.0 - 1.0
    mean = total / draws
    # Six standard deviations of a mean of +-1 draws: a wrong probability fails, chance does not.
    bound = 6 * np.sqrt((1 - expect**2) / draws) + 1e-9
    assert np.all(np.abs(mean - expect) <= bound), (mean, expect)
    assert np.all(mean[np.abs(expect) == 1] == expect[np.abs(expect) == 1])  # clipped: always that sign


def test_bad_sizes_are_named() -> None:
    with pytest.raises(ValueError, match=r"grad 8, exp_avg 7"):
        grad, mom = np.zeros(8, np.float32), np.zeros(7, np.float32)
        stochastic_sign_step(grad, mom, np.zeros(1, np.uint8), 0.9, 0.9, 1)


def test_catalogue_row_averages_stochastic_signs() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer("dlion-sto", [p], lr=1e-3, weight_decay=0.0)
    assert opt.config.vote == "average" and opt.config.binarize == "stochastic"  # type: ignore[attr-defined]
