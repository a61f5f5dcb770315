"""The CUDA kernels against the Numba CPU kernels, bit for bit.

On a machine with a GPU they run on it; elsewhere in Numba's CUDA simulator (conftest),
on small inputs. Float results are compared as raw bits.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dlion import kernels as cpu
from dlion.compress.sign import combine_majority
from dlion.compress.sign_ops import CpuSignOps, CudaSignOps
from dlion.kernels import cuda_ops as gpu
from dlion.worker.core.lion import lion_update

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [1, 7, 8, 9, 64, 203]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()]).numpy()


def assert_same(got: torch.Tensor, want: torch.Tensor | np.ndarray) -> None:
    want_t = torch.as_tensor(want)
    assert tuple(got.shape) == tuple(want_t.shape) and got.dtype == want_t.dtype
    np.testing.assert_array_equal(_bits(got), _bits(want_t))


def _signal(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random values with exact zeros sprinkled in (they take the coin path)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[torch.rand(n, generator=g) < 0.2] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("n", SIZES)
def test_pack_unpack(n: int) -> None:
    x = _signal(n, n)
    bits = gpu.pack_signs(x.to(DEV))
    assert_same(bits, cpu.pack_signs(x.numpy()))
    assert_same(gpu.unpack_signs(bits, n), cpu.unpack_signs(bits.cpu().numpy(), n))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_sign_step(n: int, dtype: torch.dtype) -> None:
    grad, m = _signal(n, 1, dtype), _signal(n, 2)
    m[grad == 0] = 0.0  # c == 0 exactly: the coin
    out, m_cpu = np.full((n + 7) // 8 + 2, 0xAA, np.uint8), m.clone()
    cpu.lion_sign_step(grad.float().numpy(), m_cpu.numpy(), out, 0.9, 0.99, 12345)
    send, m_dev = torch.full((out.size,), 0xAA, dtype=torch.uint8, device=DEV), m.to(DEV)
    gpu.lion_sign_step(grad.to(DEV), m_dev, send, 0.9, 0.99, 12345)
    assert_same(send, out)
    assert_same(m_dev, m_cpu)


@pytest.mark.parametrize("workers", [1, 2, 3, 4, 5, 6, 9])
@pytest.mark.parametrize("nbytes", [1, 5, 16, 37])
def test_votes(workers: int, nbytes: int) -> None:
    rng = np.random.default_rng(workers * 100 + nbytes)
    packed = rng.integers(0, 256, (workers, nbytes), dtype=np.uint8)
    dev = torch.from_numpy(packed).to(DEV)
    assert_same(gpu.count_planes(dev), cpu.count_planes(packed))
    win, tie = gpu.majority_vote(dev)
    want_win, want_tie = cpu.majority_vote(packed)
    assert_same(win, want_win)
    assert_same(tie, want_tie)
    if workers % 2 == 0:
        coined, _ = gpu.majority_vote(dev, tie_key=77, start=13)
        assert_same(coined, combine_majority(packed, tie="random", tie_key=77, start=13).planes[0])


@pytest.mark.parametrize("cautious", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("planes", [1, 2, 3])
def test_apply(planes: int, dtype: torch.dtype, cautious: bool) -> None:
    n = 203
    rng = np.random.default_rng(planes)
    bits = torch.from_numpy(rng.integers(0, 256, (planes, (n + 7) // 8), dtype=np.uint8))
    table = torch.from_numpy(rng.standard_normal(1 << planes).astype(np.float32))
    param = _signal(n, 3, dtype)
    want = param.clone()
    CpuSignOps().apply(want, bits, table, 1e-2, 0.1, cautious)
    got = param.to(DEV)
    gpu.apply_update(got, bits.to(DEV), table.to(DEV), 1e-2, 0.1, cautious)
    assert_same(got, want)


def _bucket(numels: list[int]) -> tuple[list[int], int]:
    offsets, at = [], 0
    for n in numels:
        offsets.append(at)
        at += (n + 7) // 8
    return offsets, -(-at // 16) * 16


@pytest.mark.parametrize("dtype", DTYPES)
def test_bucket_step_and_apply(dtype: torch.dtype) -> None:
    """Several tensors, each with its own betas, lr, wd and coin key, in one launch each."""
    numels, betas, lrs, keys = (
        [13, 64, 1, 30],
        [(0.9, 0.99), (0.5, 0.9)] * 2,
        [(1e-2, 0.1), (3e-3, 0.0)] * 2,
        [5, 6, 7, 8],
    )
    offsets, nbytes = _bucket(numels)
    grad, m = torch.zeros(8 * nbytes, dtype=dtype), torch.zeros(8 * nbytes)
    param = torch.zeros(8 * nbytes, dtype=dtype)
    send = np.zeros(nbytes, np.uint8)
    want_m, want_p = m.clone(), param.clone()
    for i, (off, n) in enumerate(zip(offsets, numels, strict=True)):
        sl = slice(8 * off, 8 * off + n)
        grad[sl], m[sl], param[sl] = _signal(n, i, dtype), _signal(n, 10 + i), _signal(n, 20 + i, dtype)
        m[sl][grad[sl] == 0] = 0.0
        want_m[sl], want_p[sl] = m[sl], param[sl]
        cpu.lion_sign_step(grad[sl].float().numpy(), want_m[sl].numpy(), send[off:], *betas[i], keys[i])
    slots = gpu.Slots.of(offsets, numels, DEV)
    out, m_dev = torch.full((nbytes,), 0xFF, dtype=torch.uint8, device=DEV), m.to(DEV)
    gpu.bucket_sign_step(
        grad.to(DEV), m_dev, out, slots, gpu.betas_table(betas, DEV), gpu.keys_table(keys, DEV)
    )
    assert_same(out, send)
    assert_same(m_dev, want_m)

    planes = torch.from_numpy(np.stack([send, np.roll(send, 3)]))
    table = torch.tensor([-1.0, 1.0, 0.5, 0.0])
    for i, (off, n) in enumerate(zip(offsets, numels, strict=True)):
        CpuSignOps().apply(want_p[8 * off : 8 * off + n], planes[:, off:], table, *lrs[i])
    p_dev = param.to(DEV)
    gpu.bucket_apply(p_dev, planes.to(DEV), table.to(DEV), slots, gpu.lr_table(lrs, DEV), False)
    assert_same(p_dev, want_p)


@pytest.mark.parametrize("cautious", [False, True])
def test_bucket_lion_is_lion(cautious: bool) -> None:
    numels, betas, lrs = [13, 64, 30], [(0.9, 0.99)] * 3, [(1e-2, 0.1)] * 3
    offsets, nbytes = _bucket(numels)
    grad, m, param = _signal(8 * nbytes, 1), _signal(8 * nbytes, 2), _signal(8 * nbytes, 3)
    m[grad == 0] = 0.0
    want_p, want_m = param.clone(), m.clone()
    for off, n in zip(offsets, numels, strict=True):
        sl = slice(8 * off, 8 * off + n)
        lion_update(
            want_p[sl],
            grad[sl],
            want_m[sl],
            lr=1e-2,
            beta1=0.9,
            beta2=0.99,
            weight_decay=0.1,
            cautious=cautious,
        )
    p_dev, m_dev = param.to(DEV), m.to(DEV)
    slots = gpu.Slots.of(offsets, numels, DEV)
    gpu.bucket_lion(
        p_dev, grad.to(DEV), m_dev, slots, gpu.betas_table(betas, DEV), gpu.lr_table(lrs, DEV), cautious
    )
    assert_same(p_dev, want_p)
    assert_same(m_dev, want_m)


def test_bad_input_names_the_value() -> None:
    with pytest.raises(ValueError, match=r"grad must be float32, bfloat16 or float16, got torch\.int32"):
        gpu.lion_sign_step(
            torch.zeros(8, dtype=torch.int32, device=DEV),
            torch.zeros(8, device=DEV),
            torch.zeros(1, dtype=torch.uint8, device=DEV),
            0.9,
            0.99,
            0,
        )
    with pytest.raises(ValueError, match="table must have 2\\^B entries for B = 2"):
        gpu.apply_update(
            torch.zeros(8, device=DEV),
            torch.zeros(2, 1, dtype=torch.uint8, device=DEV),
            torch.zeros(2, device=DEV),
            1e-3,
            0.0,
        )
    with pytest.raises(ValueError, match="slot byte offsets must start at 0"):
        gpu.Slots.of([3, 1], [8, 8], DEV)


@pytest.mark.parametrize(
    ("vote", "tie"), [("majority", "random"), ("majority", "zero"), ("average", "random")]
)
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_cuda_ops_combine_like_cpu(vote: str, tie: str, workers: int) -> None:
    packed = torch.from_numpy(np.random.default_rng(workers).integers(0, 256, (workers, 21), dtype=np.uint8))
    want = CpuSignOps().combine(packed, vote=vote, tie=tie, tie_key=99, start=5)
    got = CudaSignOps().combine(packed.to(DEV), vote=vote, tie=tie, tie_key=99, start=5)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
