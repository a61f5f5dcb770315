"""DistributedLion on a GPU (flat CUDA buckets, NCCL at world size 1) against the CPU path.

Needs a CUDA device; CI has none (the kernels themselves are tested in the simulator by
test_cuda_kernels.py). Both runs share one process: a Gloo default group for the CPU
reference and an NCCL group over the same single rank for the GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dlion import DistributedLion
from dlion.kernels import cuda_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(7,), (3, 5), (33,), (4, 4, 3), (1,), (130,), (16, 8)]


@pytest.fixture(scope="module")
def nccl_group() -> object:
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.new_group([0], backend="nccl")


def _train(device: str, dtype: torch.dtype, *, pg: object = None, **kw: object) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype)) for s in SHAPES
    ]
    groups = [{"params": params[:4], "lr": 0.01, "weight_decay": 0.1}, {"params": params[4:], "lr": 0.003}]
    opt = DistributedLion(groups, process_group=pg, bucket_numel=128, **kw)  # type: ignore[arg-type]
    for step in range(4):
        for p in params:
            g = torch.randn(p.shape, generator=gen)
            if step == 0:
                g.view(-1)[::3] = 0.0  # c == 0: the zero coin
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return [p.detach().cpu() for p in params]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and torch.equal(_bits(x), _bits(y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("backend", "vote"), [("allgather", "majority"), ("sharded", "majority"),
                                               ("server", "majority"), ("allgather", "average")])  # fmt: skip
def test_nccl_force_comm_equals_cpu(nccl_group: object, backend: str, vote: str, dtype: torch.dtype) -> None:
    kw = {"backend": backend, "vote": vote, "force_comm": True}
    _same(_train("cuda", dtype, pg=nccl_group, **kw), _train("cpu", dtype, **kw))


@pytest.mark.parametrize("backend", ["allgather", "sharded", "server"])
def test_gloo_with_cuda_tensors_equals_cpu(nccl_group: object, backend: str) -> None:
    """The default group is Gloo: CUDA bits go through pinned host buffers and back."""
    kw = {"backend": backend, "force_comm": True}
    _same(_train("cuda", torch.float32, **kw), _train("cpu", torch.float32, **kw))


def test_local_step_equals_cpu() -> None:
    _same(_train("cuda", torch.float32), _train("cpu", torch.float32))


def test_bucket_kernels_do_not_sync() -> None:
    """No host synchronisation in the fused step and apply (torch's sync debug mode)."""
    n = 1 << 16
    g, m, p = (torch.randn(n, device="cuda") for _ in range(3))
    out = torch.empty(n // 8, dtype=torch.uint8, device="cuda")
    slots = cuda_ops.Slots.of([0], [n], torch.device("cuda"))
    betas = cuda_ops.betas_table([(0.9, 0.99)], torch.device("cuda"))
    keys = cuda_ops.keys_table([1], torch.device("cuda"))
    lrs = cuda_ops.lr_table([(1e-3, 0.1)], torch.device("cuda"))
    table = torch.tensor([-1.0, 1.0], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cuda_ops.bucket_sign_step(g, m, out, slots, betas, keys)
        cuda_ops.bucket_apply(p, out.view(1, -1), table, slots, lrs, False)
        cuda_ops.bucket_lion(p, g, m, slots, betas, lrs)
        cuda_ops.betas_table([(0.9, 0.99)], torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_resume_on_gpu_equals_unbroken(nccl_group: object) -> None:
    """A state_dict taken mid-run and loaded into a fresh optimizer (flat buffers rebuilt)
    continues exactly as the unbroken run."""

    def run(split: bool) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).cuda()) for s in SHAPES]
        kw = {
            "lr": 0.01,
            "weight_decay": 0.1,
            "bucket_numel": 128,
            "force_comm": True,
            "process_group": nccl_group,
        }
        opt = DistributedLion(params, **kw)  # type: ignore[arg-type]
        for step in range(4):
            if split and step == 2:
                saved = {k: v for k, v in opt.state_dict().items()}
                opt = DistributedLion(params, **kw)  # type: ignore[arg-type]
                opt.load_state_dict(saved)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).cuda()
            opt.step()
        return [p.detach().cpu() for p in params]

    _same(run(True), run(False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_overlap_on_a_side_stream_equals_plain(nccl_group: object, dtype: torch.dtype) -> None:
    """Buckets launched from gradient hooks on a side stream, during a real backward."""

    def run(overlap: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*(torch.nn.Linear(64, 64) for _ in range(6))).to("cuda", dtype)
        opt = DistributedLion(
            model.parameters(), lr=0.01, weight_decay=0.1, bucket_numel=4096, force_comm=True,
            process_group=nccl_group, backend="sharded", overlap=overlap,  # type: ignore[arg-type]
        )  # fmt: skip
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(4):
            opt.zero_grad()
            x = torch.randn(32, 64, device="cuda", generator=gen).to(dtype)
            model(x).float().square().mean().backward()
            opt.step()
        return [p.detach().cpu() for p in model.parameters()]

    _same(run(True), run(False))


def test_a_communicating_step_never_waits_on_the_gpu(nccl_group: object) -> None:
    """Agreed on the device (nonfinite="skip"): torch's sync debug mode "error" around a
    communicating step raises nothing; a NaN step is skipped and counted when read."""
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    opt = DistributedLion(
        params,
        process_group=nccl_group,
        force_comm=True,
        backend="sharded",
        nonfinite="skip",
        bucket_numel=128,
    )
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # the first step checks the fingerprint and starts the ranks equal (host reads)
    assert opt.plan.on_device
    params[2].grad[0] = float("nan")  # type: ignore[index]
    before = [p.detach().clone() for p in params]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))
    assert opt.skipped_steps == 1
