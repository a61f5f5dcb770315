"""The flat runner (one CUDA kernel per bucket and phase) without a GPU: its kernels run on CPU
tensors in Numba's CUDA simulator, against the NumPy simulation and the per-tensor runner, bit
for bit. Covers what only the flat path does: tensors absent from a step (masked lr, momentum
taken per slot), deferred momentum (overlap), and Lion at world size 1 gated on the device."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from test_distributed_lion import BUCKET_NUMEL, GROUPS, STEPS, assert_bits_equal, init_params, make_grads
from test_overlap import _same
from test_overlap import _train as overlap_train

from dlion import DistributedLion, Lion

from multiproc import run_ok
from sim import simulate


def _flat_everywhere() -> None:
    from dlion.kernels import cuda_device
    from dlion.worker.lion import runners

    assert cuda_device.SIMULATED, "these tests run the CUDA kernels in Numba's simulator"
    runners.allow_flat_on("cuda", "cpu")


def _train(rank: int, world: int, cases: list[tuple[str, str, str]], flat: bool) -> list[dict[str, Any]]:
    if flat:
        _flat_everywhere()
    out = []
    for vote, tie, backend in cases:
        params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
        groups = [
            {"params": [params[i] for i in g.indices], "lr": g.lr, "weight_decay": g.weight_decay}
            for g in GROUPS
        ]
        opt = DistributedLion(groups, vote=vote, tie=tie, seed=7, bucket_numel=BUCKET_NUMEL, backend=backend)  # type: ignore[arg-type]
        assert [r.flat for r in opt.plan.runners] == [flat] * len(opt.plan.runners)
        grads = make_grads(world)
        for step in range(STEPS):
            for p, g in zip(params, grads[step][rank], strict=True):
                p.grad = None if g is None else torch.from_numpy(g.copy())
            opt.step()
        order = [i for g in GROUPS for i in g.indices]
        moms = {
            i: opt.state[params[i]]["exp_avg"].numpy().reshape(-1).copy()
            for i in order
            if params[i] in opt.state
        }
        out.append({"params": [p.detach().numpy().copy() for p in params], "moms": moms})
    return out


CASES = {
    2: [
        ("majority", "random", "allgather"),
        ("majority", "zero", "sharded"),
        ("average", "random", "server"),
    ],
    3: [("majority", "random", "sharded"), ("average", "random", "allgather")],
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_flat_runner_matches_the_simulation(world: int) -> None:
    """make_grads leaves a tensor out on one rank at step 1 and on every rank at step 2, and
    has exact zeros (the zero coin) at step 0."""
    results = run_ok(_train, world, cases=CASES[world], flat=True)
    grads = make_grads(world)
    for c, (vote, tie, backend) in enumerate(CASES[world]):
        kw = {"vote": vote, "tie": tie, "seed": 7, "bucket_numel": BUCKET_NUMEL}
        expect, moms = simulate(init_params(), GROUPS, grads, **kw)  # type: ignore[arg-type]
        for rank in range(world):
            assert_bits_equal(results[rank][c], expect, moms[rank], (vote, tie, backend, rank, "flat"))
        assert not np.array_equal(results[0][c]["params"][0], init_params()[0])


def _overlap(rank: int, world: int, flat: bool, backend: str) -> dict[str, object]:
    if flat:
        _flat_everywhere()
    return overlap_train(rank, world, overlap=flat, backend=backend, nan_step=2)


@pytest.mark.parametrize("backend", ["allgather", "sharded"])
def test_flat_overlap_defers_momentum_like_the_tensor_runner(backend: str) -> None:
    """Flat buckets launched from gradient hooks (momentum deferred, a NaN-skipped step, an
    unused head that holds its bucket back) equal the per-tensor runner's plain step."""
    flat = run_ok(_overlap, 2, flat=True, backend=backend)
    plain = run_ok(_overlap, 2, flat=False, backend=backend)
    for a, b in zip(flat, plain, strict=True):
        assert a["skipped"] == 1
        # Overlap sent the skipped step's bits before the ranks learnt of the NaN.
        assert a["step_bytes"][2] != b["step_bytes"][2] and a["step_bytes"][3] == b["step_bytes"][3]  # type: ignore[index]
        # The flat runner keeps a (zero) momentum for the unused head too: compare the rest.
        a = {**a, "momenta": a["momenta"][: len(b["momenta"])], "bits": 0}  # type: ignore[index]
        _same(a, {**b, "bits": 0})


def _alone(rank: int, world: int, nonfinite: str) -> dict[str, Any]:
    _flat_everywhere()
    gen = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7,), (3, 5), (33,), (16, 8)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = DistributedLion(params, lr=0.01, weight_decay=0.1, bucket_numel=128, nonfinite=nonfinite)
    lion = Lion(ref, lr=0.01, weight_decay=0.1)
    assert all(r.flat for r in opt.plan.runners)
    out: dict[str, Any] = {"error": None}
    for step in range(4):
        for p, q in zip(params, ref, strict=True):
            g = torch.randn(p.shape, generator=gen)
            g.view(-1)[::4] = 0.0  # c == 0: Lion takes sign(0) = 0, no coin
            p.grad, q.grad = g.clone(), g.clone()
        if step == 2:
            params[1].grad[0, 0] = float("inf")  # type: ignore[index]
            before = [p.detach().clone() for p in params]
            try:
                opt.step()
            except FloatingPointError as err:
                out["error"] = str(err)
            out["unchanged"] = all(torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
            continue
        opt.step()
        lion.step()
    out["same"] = all(torch.equal(p.detach(), q.detach()) for p, q in zip(params, ref, strict=True))
    out["skipped"] = opt.skipped_steps
    return out


def test_flat_lion_at_world_size_one_is_gated_on_the_device() -> None:
    """Lion as one kernel per bucket equals dlion.Lion; a step with an Inf writes nothing,
    and is skipped or raises naming the tensor after the kernels ran."""
    (skipped,) = run_ok(_alone, 1, nonfinite="skip")
    assert skipped["same"] and skipped["unchanged"] and skipped["skipped"] == 1 and skipped["error"] is None
    (raised,) = run_ok(_alone, 1, nonfinite="raise")
    assert raised["unchanged"] and "parameter #1 (3, 5)" in raised["error"]


def _communicating_nan(rank: int, world: int, flat: bool, nonfinite: str) -> dict[str, Any]:
    if flat:
        _flat_everywhere()
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(7,), (3, 5), (33,), (16, 8)]]
    opt = DistributedLion(params, lr=0.01, weight_decay=0.1, bucket_numel=128, nonfinite=nonfinite, seed=3)
    assert opt.plan.on_device == flat  # flat buckets on a torch transport agree on the device
    out: dict[str, Any] = {"error": None}
    for step in range(4):
        gen_r = torch.Generator().manual_seed(100 * step + rank)
        for i, p in enumerate(params):
            p.grad = None if (step == 1 and i == 2 and rank == 0) else torch.randn(p.shape, generator=gen_r)
        if step == 2:
            if rank == 1:
                params[1].grad[1, 2] = float("nan")  # type: ignore[index]
            before = [p.detach().clone() for p in params]
            moms = [opt.state[p]["exp_avg"].clone() for p in params]
            try:
                opt.step()
            except FloatingPointError as err:
                out["error"] = str(err)
            out["unchanged"] = all(torch.equal(a, b.detach()) for a, b in zip(before, params, strict=True))
            out["moms_unchanged"] = all(
                torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moms, params, strict=True)
            )
            continue
        opt.step()
    out["params"] = [p.detach().numpy().copy() for p in params]
    out["moms"] = [opt.state[p]["exp_avg"].numpy().copy() for p in params]
    out["skipped"] = opt.skipped_steps
    out["steps"] = opt.steps_taken
    return out


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_device_agreement_skips_and_raises_like_the_host(nonfinite: str) -> None:
    """The ranks agree on the device (the flags are device tensors, the kernels gated by them):
    a NaN on rank 1 leaves parameters and momenta as they were, like the host's agreement,
    bit for bit over the run; under "raise" every rank names rank 1 and the tensor."""
    device = run_ok(_communicating_nan, 2, flat=True, nonfinite=nonfinite)
    host = run_ok(_communicating_nan, 2, flat=False, nonfinite=nonfinite)
    for d, h in zip(device, host, strict=True):
        assert d["unchanged"] and d["moms_unchanged"] and h["unchanged"] and h["moms_unchanged"]
        for a, b in zip(d["params"] + d["moms"], h["params"] + h["moms"], strict=True):
            assert a.view(np.uint32).tolist() == b.view(np.uint32).tolist()
        assert d["skipped"] == h["skipped"] == (1 if nonfinite == "skip" else 0)
        assert d["steps"] == h["steps"] == (4 if nonfinite == "skip" else 3)  # a raise counts no step
        if nonfinite == "raise":
            assert d["error"] == h["error"] and "rank 1, parameter #1 (3, 5)" in d["error"]
        else:
            assert d["error"] is None


def test_first_nonfinite_on_device_names_the_first_bad_tensor() -> None:
    from dlion.aggregate.meta import first_nonfinite_on_device

    cpu = torch.device("cpu")
    grads: list[torch.Tensor | None] = [torch.zeros(3), None, torch.ones(2), torch.ones(4)]
    assert first_nonfinite_on_device(grads, cpu).tolist() == [-1]
    grads[3][1] = float("inf")  # type: ignore[index]
    grads[2][0] = float("nan")  # type: ignore[index]
    assert first_nonfinite_on_device(grads, cpu).tolist() == [2]
    assert first_nonfinite_on_device([None], cpu).tolist() == [-1]
