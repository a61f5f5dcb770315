"""TernGrad: kernels against their NumPy twins, the codec, and 1-4 ranks against a simulation.

Run as a script under mpiexec (``python -m mpi4py tests/test_terngrad.py OUTDIR``), this file
is also the MPI worker of ``test_mpi_matches_simulation``.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dlion import wire
from dlion.compress import terngrad as codec
from dlion.kernels import ternary as K
from dlion.kernels import ternary_ref as R
from dlion.ledger import Traffic
from dlion.wire import derive_key
from dlion.worker.baselines.terngrad import TernGrad, TernGradConfig, build_terngrad
from dlion.worker.core.checks import NonFiniteGradientError

SHAPES = [(7,), (3, 5), (33,), (1,), (4, 4, 3), (130,)]
STEPS = 3
SEED = 11
GROUPS = [([0, 1, 2], 0.05, 0.01), ([3, 4, 5], 0.02, 0.0)]  # (tensor indices, lr, weight decay)
MOMENTUM = 0.9
# (backend, clip_factor) run in every distributed test; clip_factor None is the unbiased scaler.
CASES = [("allgather", 2.5), ("server", 2.5), ("allgather", None)]


def make_grads(world: int) -> list[list[list[np.ndarray | None]]]:
    """[step][rank][tensor]: exact zeros and an outlier (clipped at 2.5 sigma) at step 0,
    tensor 2 absent on the last rank at step 1, tensor 3 absent on every rank at step 2."""
    out = []
    for step in range(STEPS):
        per_rank: list[list[np.ndarray | None]] = []
        for rank in range(world):
            rng = np.random.default_rng([step, rank])
            grads: list[np.ndarray | None] = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
            if step == 0:
                grads[5].reshape(-1)[::3] = 0.0  # type: ignore[union-attr]
                grads[5].reshape(-1)[7] = 40.0  # type: ignore[union-attr]
            if step == 1 and rank == world - 1:
                grads[2] = None
            if step == 2:
                grads[3] = None
            per_rank.append(grads)
        out.append(per_rank)
    return out


def init_params() -> list[torch.nn.Parameter]:
    rng = np.random.default_rng(5)
    return [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s).astype(np.float32))) for s in SHAPES]


def make_sgd(params: list[torch.nn.Parameter]) -> torch.optim.SGD:
    groups = [{"params": [params[i] for i in idx], "lr": lr, "weight_decay": wd} for idx, lr, wd in GROUPS]
    return torch.optim.SGD(groups, lr=0.1, momentum=MOMENTUM)


def simulate(world: int, clip: float | None) -> list[torch.Tensor]:
    """N workers in one process: NumPy-reference draws with the shared max scaler, the
    integer sum of the ternary values, (sum * s) / N, then the same SGD."""
    params = init_params()
    sgd = make_sgd(params)
    grads = make_grads(world)
    for step in range(STEPS):
        for i, p in enumerate(params):
            per_rank = [grads[step][r][i] for r in range(world)]
            if all(g is None for g in per_rank):
                p.grad = None
                continue
            flat = [np.zeros(p.numel(), np.float32) if g is None else g.reshape(-1) for g in per_rank]
            s = max(codec.local_scaler(g, clip) for g in flat)
            keys = [derive_key(SEED, wire.TERN_STREAM, step, r, i) for r in range(world)]
            total = sum(R.ternarize_ref(g, s, k).astype(np.int32) for g, k in zip(flat, keys, strict=True))
            mean = np.asarray(total).astype(np.float32) * np.float32(s) / np.float32(world)
            p.grad = torch.from_numpy(mean.reshape(p.shape))
        sgd.step()
    return [p.detach() for p in params]


def train(
    rank: int, world: int, backend: str, clip: float | None, transport: str = "torch"
) -> dict[str, Any]:
    params = init_params()
    config = TernGradConfig(backend=backend, clip_factor=clip, seed=SEED, transport=transport)  # type: ignore[arg-type]
    opt = TernGrad(make_sgd(params), config=config)
    grads = make_grads(world)
    for step in range(STEPS):
        for p, g in zip(params, grads[step][rank], strict=True):
            p.grad = None if g is None else torch.from_numpy(g.copy())
        opt.step()
    return {"params": [p.detach().clone() for p in params], "ledger": opt.ledger.steps}


def run_cases(rank: int, world: int, transport: str = "torch") -> list[dict[str, Any]]:
    return [train(rank, world, b, c, transport) for b, c in CASES]


# ---- kernels against their NumPy twins ------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 31, 4 * 4096 + 3, 70001])
def test_kernels_match_references(n: int) -> None:
    rng = np.random.default_rng(n)
    g = rng.standard_normal(2 * n).astype(np.float32)[::2]  # strided input
    g[::5] = 0.0
    top = float(np.abs(g).max()) if n else 0.0
    key = derive_key(3, wire.TERN_STREAM, 7, 1, 2)
    for scale in (top, 0.3 * top, 0.0):
        t = K.ternarize(g, scale, key)
        assert t.dtype == np.int8 and np.array_equal(t, R.ternarize_ref(g, scale, key))
        out, ref = np.full((n + 3) // 4, 0xFF, np.uint8), np.full((n + 3) // 4, 0xFF, np.uint8)
        K.ternarize_pack(g, scale, key, out)
        R.ternarize_pack_ref(g, scale, key, ref)
        assert np.array_equal(out, ref) and np.array_equal(K.pack_ternary(t), ref)
        assert np.array_equal(R.pack_ternary_ref(t), ref)
        assert np.array_equal(K.unpack_ternary(out, n), t) and np.array_equal(R.unpack_ternary_ref(out, n), t)
    for workers in (1, 2, 3, 4, 5):
        packets = rng.integers(0, 256, (workers, (n + 3) // 4), dtype=np.uint8)  # 11 included: reads 0
        sums = K.sum_ternary(packets)
        assert np.array_equal(sums, R.sum_ternary_ref(packets))
        planes = K.pack_levels(sums, workers)
        assert planes.shape == (R.level_bits(workers), (sums.size + 7) // 8)
        assert np.array_equal(planes, R.pack_levels_ref(sums, workers))
        assert np.array_equal(K.unpack_levels(planes, workers, sums.size), sums)
        assert np.array_equal(R.unpack_levels_ref(planes, workers, sums.size), sums)


def test_kernel_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="grad must be float32"):
        K.ternarize(np.zeros(4), 1.0, 0)
    with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
        K.ternarize(np.zeros(4, np.float32), float("nan"), 0)
    with pytest.raises(ValueError, match="out has 1 bytes; need at least 2"):
        K.ternarize_pack(np.zeros(5, np.float32), 1.0, 0, np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match=r"sums must lie in \[-2, 2\]"):
        K.pack_levels(np.array([3], np.int32), 2)


# ---- the codec --------------------------------------------------------------------------------


def test_wire_code_and_level_bits() -> None:
    # 00 = 0, 01 = +1, 10 = -1, most significant first.
    assert K.pack_ternary(np.array([1, -1, 0, 1, -1], np.int8)).tolist() == [0b01100001, 0b10000000]
    assert [R.level_bits(n) for n in (1, 2, 3, 4, 8)] == [2, 3, 3, 4, 5]  # ceil(log2(2N + 1))


def test_codec_round_trip_is_exact_for_ternary_values() -> None:
    """A layer already in {-s, 0, s} draws with probability 0 or 1: decode(encode(g)) == g."""
    rng = np.random.default_rng(0)
    shapes = [(5,), (2, 3), (1,), (17,)]
    ternary = [rng.integers(-1, 2, s).astype(np.float32) * np.float32(0.375) for s in shapes]
    layout = codec.plan_layout(range(len(shapes)), [t.size for t in ternary])
    assert layout.nbytes % 16 == 0 and layout.byte_offsets == (0, 2, 4, 5)
    scales = [codec.local_scaler(t, None) for t in ternary]
    packet = codec.encode(layout, [t.reshape(-1) for t in ternary], scales, [9, 8, 7, 6])
    assert packet.dtype == np.uint8 and packet.shape == (layout.nbytes,)
    sums = codec.sum_codes(packet[None, :])
    for j, t in enumerate(ternary):
        back = codec.decode_mean(sums[layout.slots(j)], scales[j], 1).reshape(t.shape)
        assert back.dtype == np.float32 and np.array_equal(back, t)
    planes = codec.pack_sums(sums, 1, layout.sums_bytes())
    assert planes.shape == (2, layout.sums_bytes())
    assert np.array_equal(codec.unpack_sums(planes, 1, layout.n_slots), sums)


def test_unbiased_without_clipping() -> None:
    """Mean of K = 20000 seeded draws of s * t is within 5 standard errors of g, per element.

    Var(s * t_k) = s |g_k| - g_k^2, so the tolerance is 5 sqrt((s |g_k| - g_k^2) / K), plus
    s * 2^-24 for the grid of the uniform draw. Values beyond the scaler clip to sign(g) * s.
    """
    rng = np.random.default_rng(1)
    g = (rng.standard_normal(64) * rng.choice([1e-3, 1.0], 64)).astype(np.float32)
    s = codec.local_scaler(g, None)
    draws = 20000
    t = K.ternarize(np.tile(g, draws), s, codec.draw_key(0, 0, 0, 0)).reshape(draws, g.size)
    mean = t.astype(np.float64).mean(axis=0) * float(s)
    gd = g.astype(np.float64)
    tol = 5 * np.sqrt(np.maximum(float(s) * np.abs(gd) - gd**2, 0) / draws) + float(s) * 2.0**-24
    assert np.all(np.abs(mean - gd) <= tol)
    half = np.float32(s / 2)  # clipped: every element beyond the scaler keeps its sign
    assert np.array_equal(K.ternarize(g, half, 5)[np.abs(g) >= half], np.sign(g[np.abs(g) >= half]))


def test_scalers_and_clipping() -> None:
    g = np.array([0.1, -0.2, 0.1, 8.0] + [0.0] * 12, np.float32)
    assert codec.local_scaler(g, None) == np.float32(8.0)
    sigma = float(np.std(g.astype(np.float64)))
    assert codec.local_scaler(g, 2.5) == np.float32(2.5 * sigma) < 8.0
    assert codec.local_scaler(np.full(3, -0.5, np.float32), 2.5) == np.float32(0.5)  # sigma = 0
    assert codec.local_scaler(np.zeros(0, np.float32), 2.5) == 0.0
    both = codec.shared_scalers(np.array([[1.0, 4.0], [3.0, 2.0]], np.float32))
    assert both.tolist() == [3.0, 4.0]


def test_draws_are_reproducible_and_differ_by_rank() -> None:
    g = np.random.default_rng(2).standard_normal(4096).astype(np.float32)
    s = codec.local_scaler(g, None)
    draw = [K.ternarize(g, s, codec.draw_key(7, 3, rank, 1)) for rank in (0, 0, 1)]
    assert np.array_equal(draw[0], draw[1])
    assert np.mean(draw[0] != draw[2]) > 0.2
    keys = {codec.draw_key(7, 3, 0, 1), codec.draw_key(8, 3, 0, 1), codec.draw_key(7, 4, 0, 1)}
    assert len(keys | {codec.draw_key(7, 3, 0, 2)}) == 4  # seed, step and tensor each change the key


# ---- the optimizer, single process ------------------------------------------------------------


@pytest.mark.parametrize("clip", [2.5, None])
def test_single_process_equals_simulation(clip: float | None) -> None:
    got = train(0, 1, "allgather", clip)
    for a, b in zip(got["params"], simulate(1, clip), strict=True):
        assert torch.equal(a, b)
    assert got["ledger"] == []  # nothing is sent with one worker


def test_nonfinite_raise_skip_and_state_dict() -> None:
    p = torch.nn.Parameter(torch.ones(5))
    opt = build_terngrad([p], lr=0.1, weight_decay=0.0, betas=(0.9, 0.99))
    assert isinstance(opt.inner, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0, 0.0])
    with pytest.raises(NonFiniteGradientError, match="parameter #0"):
        opt.step()
    skip = TernGrad(torch.optim.SGD([p], lr=0.1, momentum=0.9), config=TernGradConfig(nonfinite="skip"))
    skip.step()
    assert torch.equal(p.detach(), torch.ones(5)) and (skip.steps_taken, skip.skipped_steps) == (1, 1)
    p.grad = torch.ones(5)
    skip.step()
    assert skip.state_dict()["terngrad"] == {"steps_taken": 2, "skipped_steps": 1}
    again = TernGrad(torch.optim.SGD([p], lr=0.1, momentum=0.9))
    again.load_state_dict(skip.state_dict())
    assert again.steps_taken == 2 and "momentum_buffer" in again.state[p]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "sharded"}, "backend must be one of"),
        ({"transport": "nccl"}, "transport must be one of"),
        ({"clip_factor": 0.0}, "clip_factor must be a number > 0 or None, got 0.0"),
        ({"clip_factor": float("inf")}, "clip_factor must be finite"),
        ({"seed": -1}, "seed must be an int >= 0, got -1"),
        ({"nonfinite": "ignore"}, "nonfinite must be one of"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TernGradConfig(**kwargs)


# ---- distributed: Gloo ranks against the simulation, and the ledger against the cost model ----


def _expected_step(
    world: int, rank: int, backend: str, live: list[int], step: int
) -> tuple[Traffic, Traffic]:
    """(sent, received) bits of one step by docs/design.md's cost model, computed from scratch."""
    peers = world - 1
    t = len(SHAPES)
    meta = Traffic(metadata=8 * (4 + (t + 7) // 8) + (64 * 6 if step == 0 else 0)) * peers
    scalers = Traffic(scalers=32 * t, padding=32 * (-(-t // 4) * 4 - t)) * peers
    numel = sum(int(np.prod(SHAPES[i])) for i in live)
    nbytes = -(-sum((int(np.prod(SHAPES[i])) + 3) // 4 for i in live) // 16) * 16
    codes = Traffic(payload=2 * numel, padding=8 * nbytes - 2 * numel)
    b = (2 * world).bit_length()
    plane = -(-nbytes // 2 // 16) * 16
    sums = Traffic(payload=b * numel, padding=8 * b * plane - b * numel)
    if backend == "allgather":
        return meta + scalers + codes * peers, meta + scalers + codes * peers
    if rank == 0:  # the co-located server
        return meta + scalers + sums * peers, meta + scalers + codes * peers
    return meta + scalers + codes, meta + scalers + sums


def assert_matches_simulation(results: list[list[dict[str, Any]]], world: int) -> None:
    live_by_step = [[0, 1, 2, 3, 4, 5]] * 2 + [[0, 1, 2, 4, 5]]
    for c, (backend, clip) in enumerate(CASES):
        expect = simulate(world, clip)
        for rank, per_case in enumerate(results):
            res = per_case[c]
            for a, b in zip(res["params"], expect, strict=True):
                assert torch.equal(a, b), (backend, clip, rank)
            for step, records in enumerate(res["ledger"]):
                sent = sum((r.sent for r in records), Traffic())
                received = sum((r.received for r in records), Traffic())
                assert (sent, received) == _expected_step(world, rank, backend, live_by_step[step], step)
                if backend == "allgather":  # 2 bits per element to and from each peer
                    codes = next(r for r in records if r.name == "codes")
                    numel = sum(int(np.prod(SHAPES[i])) for i in live_by_step[step])
                    assert codes.sent.payload == codes.received.payload == 2 * numel * (world - 1)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_gloo_ranks_match_simulation(world: int) -> None:
    """Every backend on N Gloo ranks equals the single-process simulation, bit for bit, and
    its ledger equals the cost model: 2 bits per element, scalers and padding apart."""
    from multiproc import run_ok

    assert_matches_simulation(run_ok(run_cases, world), world)


def test_mpi_matches_simulation(tmp_path: Path) -> None:
    import importlib.util

    from dlion.run.mpi import find_mpiexec

    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("needs mpi4py")
    try:
        mpiexec = find_mpiexec()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    world = 2  # Gloo covers 3 and 4 ranks; this checks the transport
    cmd = [
        mpiexec,
        "--allow-run-as-root",
        "--oversubscribe",
        "-n",
        str(world),
        sys.executable,
        "-m",
        "mpi4py",
    ]
    cmd += [__file__, str(tmp_path)]
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    assert_matches_simulation(results, world)


if __name__ == "__main__":  # the MPI worker
    from mpi4py import MPI

    me, size = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    out = run_cases(me, size, transport="mpi")
    Path(sys.argv[1], f"rank{me}.pkl").write_bytes(pickle.dumps(out))
