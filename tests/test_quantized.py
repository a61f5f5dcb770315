"""The blockwise 8- and 4-bit codec (dlion.compress.quant) against NumPy, its quantized
all-reduce on 2-4 Gloo ranks against a single-process reference bit for bit, its bytes against
the cost model, and DiLoCo with a quantized outer exchange (diloco, outer_bits)."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch
from test_local_steps import _feed, init_params, make_grads

from dlion.compress.quant import (
    BlockQuant,
    chunk_len,
    dequantize,
    qmax,
    quantize,
    quantized_all_reduce_bits,
)

from multiproc import run_ok


def _values(seed: object, numel: int, block: int) -> np.ndarray:
    """Normal values whose magnitude changes by up to 10^4 from block to block, one block of
    exact zeros (its scale is 0), and a few exact ties of the rounding."""
    rng = np.random.default_rng(seed)  # type: ignore[call-overload]
    x = rng.standard_normal(numel) * 10.0 ** rng.uniform(-3, 1, -(-numel // block)).repeat(block)[:numel]
    x[2 * block : 3 * block] = 0.0
    return x.astype(np.float32)


# ---- the codec


def _np_quantize(x: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NumPy's own: (codes bytes, scales, dequantized) of one float32 row, block by block."""
    top = np.float32(qmax(bits))
    q, scales, out = [], [], []
    for lo in range(0, x.size, block):
        b = x[lo : lo + block]
        s = np.float32(np.abs(b).max()) / top
        c = np.clip(np.rint(b / s), -top, top) if s > 0 else np.zeros_like(b)
        q.append(c.astype(np.int8))
        scales.append(s)
        out.append(q[-1].astype(np.float32) * s)  # an integer code: no -0
    codes = np.concatenate(q).view(np.uint8)
    if bits == 4:
        codes = (codes[0::2] & 0x0F) | ((codes[1::2] & 0x0F) << 4)
    return codes, np.array(scales, np.float32), np.concatenate(out).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("numel", "block"), [(1000, 64), (4096, 1024), (130, 1)])
def test_codec_equals_numpy_and_errs_at_most_half_a_scale(bits: int, numel: int, block: int) -> None:
    x = _values([bits, numel], numel, block)
    if block > 8:  # a tie, x / scale = 0.5 exactly: to even, 0
        x[5] = np.float32(np.abs(x[:block]).max()) / np.float32(qmax(bits)) / np.float32(2)
    codes, scales = quantize(torch.from_numpy(x), bits, block)
    back = dequantize(codes, scales, bits, block)
    np_codes, np_scales, np_back = _np_quantize(x, bits, block)
    assert codes.numpy().tobytes() == np_codes.tobytes()
    assert scales.numpy().tobytes() == np_scales.tobytes()
    assert back.numpy().tobytes() == np_back.tobytes()
    # |x - x'| <= scale / 2, up to the fp32 rounding of x / scale and of q * scale (each at most
    # qmax ulps of the scale's magnitude).
    per = np.repeat(scales.double().numpy(), block)[:numel]
    err = np.abs(x.astype(np.float64) - back.double().numpy())
    assert np.all(err <= per * (0.5 + 2 * qmax(bits) * 2.0**-24))
    assert np.all(back.numpy()[2 * block : 3 * block] == 0)


def test_four_bit_layout_and_rows() -> None:
    """Two's complement nibbles, element 2k low; a [rows, L] tensor is quantized row by row."""
    codes, scales = quantize(torch.tensor([1.0, -1.0, 7.0, -7.0]), 4, 4)
    assert codes.tolist() == [0xF1, 0x97] and scales.tolist() == [1.0]
    codec = BlockQuant(bits=4, block=3)
    rows = torch.from_numpy(_values(1, 40, 3).reshape(4, 10))
    msg = codec.encode(rows)
    assert msg.shape == (4, codec.message_bytes(10)) == (4, 4 * 4 + 5)
    for r in range(4):
        assert torch.equal(codec.decode(msg[r], 10), dequantize(*quantize(rows[r], 4, 3), 4, 3))


# ---- the quantized all-reduce on Gloo ranks

# (bits, block, numel): partial blocks and padding; then chunks of whole blocks at N = 2 and 4.
CASES = [(8, 64, 1001), (4, 64, 1001), (4, 7, 333), (8, 1024, 8192), (4, 1024, 8192)]


def _reference_mean(flats: list[torch.Tensor], bits: int, block: int) -> torch.Tensor:
    """One process: each rank's buffer quantized chunk by chunk; chunk j's N versions
    dequantized, summed in rank order, divided by N, quantized again; everything dequantized."""
    n, numel = len(flats), flats[0].numel()
    chunk = chunk_len(numel, n, BlockQuant(bits=bits, block=block))
    padded = [torch.nn.functional.pad(f, (0, n * chunk - numel)).view(n, chunk) for f in flats]
    seen = [dequantize(*quantize(p, bits, block), bits, block) for p in padded]
    out = []
    for j in range(n):
        total = seen[0][j].clone()
        for r in range(1, n):
            total += seen[r][j]
        out.append(dequantize(*quantize(total / n, bits, block), bits, block))
    return torch.cat(out)[:numel]


def _exchange_rank(rank: int, world: int) -> list[tuple[torch.Tensor, list[object]]]:
    from dlion.ledger import Ledger
    from dlion.transport import TorchComm
    from dlion.worker.baselines.global_opt import QuantizedAllReduce

    comm, out = TorchComm(None, timedelta(seconds=60)), []
    for bits, block, numel in CASES:
        route = QuantizedAllReduce(BlockQuant(bits=bits, block=block))
        flat = torch.zeros(route.padded(numel, world))
        flat[:numel] = torch.from_numpy(_values([rank, numel], numel, block))
        ledger = Ledger(n_params=numel)
        ledger.begin_step()
        mean = route.mean(comm, flat, numel, ledger)
        ledger.end_step()
        out.append((mean[:numel].clone(), ledger.steps[0]))
    return out


@pytest.mark.parametrize("world", [2, 3, 4])
def test_quantized_all_reduce_equals_reference_and_cost_model(world: int) -> None:
    results = run_ok(_exchange_rank, world)
    for c, (bits, block, numel) in enumerate(CASES):
        flats = [torch.from_numpy(_values([r, numel], numel, block)) for r in range(world)]
        expect = _reference_mean(flats, bits, block).view(torch.int32)
        exact = torch.stack(flats).sum(0) / world
        assert (expect.view(torch.float32) - exact).abs().max() > 0  # it did quantize
        codec = BlockQuant(bits=bits, block=block)
        chunk = chunk_len(numel, world, codec)
        for rank in range(world):
            mean, records = results[rank][c]
            assert torch.equal(mean.view(torch.int32), expect), (bits, block, numel, rank)
            assert [(r.name, r.op) for r in records] == [
                ("grads.shards", "all_to_all"),
                ("grads.result", "all_gather"),
            ]
            sent = sum(r.sent.bits for r in records)
            received = sum(r.received.bits for r in records)
            assert sent == received == quantized_all_reduce_bits(numel, world, codec)
            blocks = -(-chunk // block)
            assert sum(r.sent.scalers for r in records) == 2 * (world - 1) * 32 * blocks
            assert sum(r.sent.payload + r.sent.padding for r in records) == 2 * (world - 1) * chunk * bits
        # Over all ranks, each collective's payload is the values themselves, N - 1 times.
        payload = sum(r.sent.payload for res in results for r in res[c][1])
        assert payload == 2 * (world - 1) * numel * bits
        if numel % (world * block) == 0:  # whole blocks: 2 (N-1)/N (bits + 32/block) a value
            per_value = quantized_all_reduce_bits(numel, world, codec) / numel
            assert per_value == 2 * (world - 1) / world * (bits + 32 / block)


# ---- DiLoCo with a quantized outer exchange

H, STEPS, LR, WD = 3, 9, 0.01, 0.1
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9


def _diloco_reference(world: int, bits: int | None) -> tuple[list[torch.Tensor], float]:
    """DiLoCo in one process (as tests/test_diloco.py's), the mean pseudo-gradient of the
    tensors some rank moved in the round in fp32 or by ``_reference_mean``; also the largest
    |pseudo-gradient| of any rank, which bounds every scale."""
    grads = make_grads(world, STEPS)
    anchor = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
    outer = torch.optim.SGD(anchor, lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)
    workers = [[torch.nn.Parameter(a.detach().clone()) for a in anchor] for _ in range(world)]
    inner = [torch.optim.AdamW(w, lr=LR, betas=(0.9, 0.999), weight_decay=WD) for w in workers]
    largest = 0.0
    for step in range(STEPS):
        for r in range(world):
            for p, g in zip(workers[r], grads[step][r], strict=True):
                p.grad = None if g is None else torch.from_numpy(g.copy())
            inner[r].step()
        if (step + 1) % H:
            continue
        rounds = grads[step + 1 - H : step + 1]
        live = [
            i for i in range(len(anchor)) if any(g[r][i] is not None for g in rounds for r in range(world))
        ]
        flats = [
            torch.cat([(anchor[i] - workers[r][i]).detach().reshape(-1) for i in live]) for r in range(world)
        ]
        largest = max(largest, max(float(f.abs().max()) for f in flats))
        mean = (
            sum(flats[1:], flats[0].clone()) / world if bits is None else _reference_mean(flats, bits, 1024)
        )
        offset = 0
        for i, a in enumerate(anchor):
            a.grad = None
            if i in live:
                a.grad = mean[offset : offset + a.numel()].view(a.shape).clone()
                offset += a.numel()
        outer.step()
        for w in workers:
            for p, a in zip(w, anchor, strict=True):
                p.data.copy_(a.detach())
    return [a.detach().clone() for a in anchor], largest


def _diloco_rank(rank: int, world: int) -> dict[int, tuple[list[np.ndarray], list[int]]]:
    import dlion

    out = {}
    for bits in (8, 4):
        params = [torch.nn.Parameter(torch.from_numpy(p)) for p in init_params()]
        opt = dlion.build_optimizer("diloco", params, lr=LR, weight_decay=WD, local_steps=H, outer_bits=bits)
        _feed(opt, params, rank, make_grads(world, STEPS), range(STEPS))
        exchanged = [
            sum(r.sent.bits + r.received.bits for r in step if r.name.startswith("grads"))
            for step in opt.ledger.steps  # type: ignore[attr-defined]
        ]
        out[bits] = ([p.detach().numpy().copy() for p in params], exchanged)
    return out


def test_quantized_diloco_on_two_ranks() -> None:
    """Bit for bit the quantized reference; and within the quantization's reach of fp32 DiLoCo.

    Per round each rank's pseudo-gradient and then the mean are quantized, each off by at most
    half a scale, a scale at most D / qmax (D the largest |pseudo-gradient|): the mean is off
    by at most D / qmax. Torch's Nesterov SGD moves the parameters by lr (g + m buf), buf =
    m buf + g, so an error in round s of R reaches the end times lr (1 + m (1 + m + ... +
    m^(R-s))). The inner steps see the same gradients in both runs, so the runs differ only
    through AdamW's decay of the (slightly different) parameters: 5% on top covers it."""
    results = run_ok(_diloco_rank, 2)
    fp32, largest = _diloco_reference(2, None)
    rounds = STEPS // H
    reach = OUTER_LR * sum(
        1 + OUTER_MOMENTUM * sum(OUTER_MOMENTUM**k for k in range(rounds - s + 1))
        for s in range(1, rounds + 1)
    )
    live = sum(p.size for i, p in enumerate(init_params()) if i != 4)  # tensor 4 never has a gradient
    for bits in (8, 4):
        expect, _ = _diloco_reference(2, bits)
        bound = 1.05 * reach * largest / qmax(bits)
        codec_bits = 2 * quantized_all_reduce_bits(live, 2, BlockQuant(bits=bits))
        for params, exchanged in (results[0][bits], results[1][bits]):
            for a, b in zip(params, expect, strict=True):
                assert a.view(np.uint32).tolist() == b.numpy().view(np.uint32).tolist(), bits
            off = max(float(np.abs(a - f.numpy()).max()) for a, f in zip(params, fp32, strict=True))
            assert 0 < off <= bound, (bits, off, bound)
            assert exchanged == [0, 0, codec_bits] * rounds  # sent + received, per round
        assert all(
            np.array_equal(a, b) for a, b in zip(results[0][bits][0], results[1][bits][0], strict=True)
        )


# ---- refusals


def test_bad_values_are_refused_by_name() -> None:
    import dlion
    from dlion.train.args import parse_config
    from dlion.train.config import TrainConfig
    from dlion.worker.baselines.global_opt import GlobalConfig
    from dlion.worker.local.config import DiLoCoOptions

    with pytest.raises(ValueError, match=r"outer_bits must be one of 8, 4 or None .*got 3"):
        DiLoCoOptions(outer_bits=3)
    with pytest.raises(ValueError, match=r"quantize_bits must be one of 8, 4 or None .*got True"):
        GlobalConfig(quantize_bits=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"quantize_bits must be .*got 8.0"):
        GlobalConfig(quantize_bits=8.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantize_block must be an int >= 1, got 0"):
        GlobalConfig(quantize_bits=8, quantize_block=0)
    with pytest.raises(ValueError, match="wire_dtype must be 'float32' with it, got 'bfloat16'"):
        GlobalConfig(quantize_bits=4, wire_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"bits must be one of 8, 4 .*got 2"):
        BlockQuant(bits=2)
    with pytest.raises(ValueError, match="4-bit codes pack 2 per byte; a row of 5 elements"):
        quantize(torch.zeros(5), 4, 4)
    with pytest.raises(ValueError, match="a message of a 10-element row is 18 bytes, got 13"):
        BlockQuant(bits=8, block=8).decode(torch.zeros(13, dtype=torch.uint8), 10)
    with pytest.raises(ValueError, match="outer_bits is an option of diloco; got optimizer 'adamw-global'"):
        TrainConfig(optimizer="adamw-global", outer_bits=8)
    with pytest.raises(ValueError, match="outer_bits is an option of diloco; got optimizer 'dlion-local'"):
        dlion.build_optimizer(
            "dlion-local", [torch.nn.Parameter(torch.zeros(2))], lr=0.1, weight_decay=0.0, outer_bits=8
        )
    with pytest.raises(SystemExit):
        parse_config(["--optimizer", "diloco", "--outer-bits", "2"])
    cfg = TrainConfig(optimizer="diloco", outer_bits=4)
    assert parse_config(cfg.to_argv()) == cfg and cfg.build_args().options.outer_bits == 4
