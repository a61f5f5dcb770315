"""``--sampling stream``: non-overlapping windows, each rank its own, no byte twice per epoch;
the same batches under virtual workers and after a resume."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dlion.train.config import TrainConfig
from dlion.train.data import BatchSampler, StreamCursor, StreamSampler
from dlion.train.faults import FAULT_ONCE_ENV, FAULT_RANK_ENV, FAULT_STEP_ENV

from test_train import TINY, _run

CONTEXT, BATCH = 8, 3
STREAM = ["--sampling", "stream"]


def _data(n: int = 1000) -> torch.Tensor:
    """Bytes whose windows are told apart by their first byte's position (n < 65536)."""
    return (torch.arange(n) % 251).to(torch.uint8)


def _ranks(world: int, data: torch.Tensor | None = None, seed: int = 0) -> list[StreamSampler]:
    d = _data() if data is None else data
    return [
        StreamSampler(d, batch_size=BATCH, context=CONTEXT, seed=seed, rank=r, world_size=world)
        for r in range(world)
    ]


def test_an_epoch_gives_every_window_once_split_disjointly_over_the_ranks() -> None:
    world = 3
    ranks = _ranks(world)
    s = ranks[0]
    assert s.n_windows == (1000 - 1) // CONTEXT == 124 and s.steps_per_epoch == 124 // (world * BATCH)
    seen: list[int] = []
    for batch in range(s.steps_per_epoch):
        step = [r.starts(batch).tolist() for r in ranks]
        assert all(len(w) == BATCH for w in step)
        flat = [x for w in step for x in w]
        assert len(set(flat)) == len(flat), f"ranks share a window at batch {batch}: {step}"
        seen += flat
    assert len(seen) == len(set(seen)) == s.steps_per_epoch * world * BATCH  # no window twice
    assert all(x % CONTEXT == 0 and 0 <= x <= (s.n_windows - 1) * CONTEXT for x in seen)
    # Each window's targets are bytes x+1 .. x+CONTEXT: over the epoch no byte is a target twice.
    targets = [x + k for x in seen for k in range(1, CONTEXT + 1)]
    assert len(targets) == len(set(targets))
    # The next epoch is a new order of the same windows; the ranks stay disjoint in it.
    again = [
        x
        for b in range(s.steps_per_epoch, 2 * s.steps_per_epoch)
        for r in ranks
        for x in r.starts(b).tolist()
    ]
    assert set(again) <= set(range(0, s.n_windows * CONTEXT, CONTEXT)) and again != seen
    assert len(again) == len(set(again))
    assert s.epochs(2 * s.steps_per_epoch) == 2.0


def test_batches_are_the_windows_inputs_and_shifted_targets_seeded_by_the_run() -> None:
    data = _data()
    s = _ranks(2, data)[1]
    starts = s.starts(0)
    x, y = s.next()
    assert x.shape == y.shape == (BATCH, CONTEXT) and x.dtype == torch.int64
    for row, start in enumerate(starts.tolist()):
        assert x[row].tolist() == data[start : start + CONTEXT].tolist()
        assert y[row].tolist() == data[start + 1 : start + CONTEXT + 1].tolist()
    other_seed = _ranks(2, data, seed=1)[1]
    assert not torch.equal(other_seed.starts(0), starts)
    assert s.generator.batches == 1 and torch.equal(s.next()[0], _batch_at(_ranks(2, data)[1], 1))


def _batch_at(s: StreamSampler, batch: int) -> torch.Tensor:
    s.generator.set_state(torch.tensor([StreamCursor.TAG, batch]))
    return s.next()[0]


def test_the_cursor_state_restores_the_position_and_refuses_an_rng_state() -> None:
    a = _ranks(2)[0]
    for _ in range(a.steps_per_epoch + 3):  # into the second epoch
        a.next()
    saved = a.generator.get_state()
    ahead = [a.next()[0] for _ in range(4)]
    b = _ranks(2)[0]
    b.generator.set_state(saved)
    assert all(torch.equal(b.next()[0], want) for want in ahead)
    rng = BatchSampler(_data(), batch_size=BATCH, context=CONTEXT, seed=0, rank=0).generator.get_state()
    with pytest.raises(ValueError, match="a checkpoint of --sampling random"):
        b.generator.set_state(rng)


def test_bad_streams_and_configs_are_refused_naming_the_value() -> None:
    with pytest.raises(ValueError, match="holds 124 windows of context 8; a step of 50 rank"):
        StreamSampler(_data(), batch_size=3, context=CONTEXT, seed=0, rank=0, world_size=50)
    with pytest.raises(ValueError, match="rank must be an int in"):
        StreamSampler(_data(), batch_size=3, context=CONTEXT, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="sampling must be one of random, stream; got 'shuffle'"):
        TrainConfig(sampling="shuffle")
    with pytest.raises(ValueError, match="task 'digits' takes sampling='random'"):
        TrainConfig(task="digits", sampling="stream")


def _job(out: Path, *flags: str, env: dict[str, str] | None = None) -> Any:
    cmd = [sys.executable, "-m", "dlion", "train", "--optimizer", "dlion-mavo", *TINY, *STREAM, *flags]
    return _run([*cmd, "--out", str(out)], env=env)


def _report(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def _same_training(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_sha256"] == b["param_sha256"]
    for key in ("train_loss", "train_loss_mean_by_rank", "val_loss"):
        assert a[key] == b[key], key


@pytest.mark.slow  # CI: the resume test below runs the stream across processes
def test_stream_virtual_workers_equal_processes_and_report_the_epochs(tmp_path: Path) -> None:
    real, virtual, rand = tmp_path / "real", tmp_path / "virtual", tmp_path / "random"
    for out, flags in ((real, ["--workers", "2"]), (virtual, ["--virtual-workers", "2"])):
        proc = _job(out, *flags)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _report(real), _report(virtual)
    _same_training(a, b)
    corpus = a["corpus"]
    # TINY: 5 steps x 2 ranks x batch 4 x context 32 of the training split's bytes.
    assert corpus["sampling"] == "stream" and corpus["target_bytes"] == 5 * 2 * 4 * 32
    steps_per_epoch = corpus["windows_per_epoch"] // 8
    assert steps_per_epoch == (corpus["train_bytes"] - 1) // 32 // 8
    assert corpus["epochs"] == pytest.approx(5 / steps_per_epoch) and corpus["epochs"] < 1
    cmd = [sys.executable, "-m", "dlion", "train", "--optimizer", "dlion-mavo", *TINY, "--workers", "2"]
    proc = _run([*cmd, "--out", str(rand)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _report(rand)["param_sha256"] != a["param_sha256"]  # the stream is not the random draw


def test_stream_resumed_mid_run_equals_an_unbroken_run(tmp_path: Path) -> None:
    ckpt = ["--checkpoint-every", "2"]
    whole = tmp_path / "whole"
    proc = _job(whole, "--workers", "2", *ckpt, "--checkpoint-dir", str(tmp_path / "whole-ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fault = {FAULT_RANK_ENV: "1", FAULT_STEP_ENV: "3", FAULT_ONCE_ENV: str(tmp_path / "fired")}
    resumed, where = tmp_path / "resumed", ["--checkpoint-dir", str(tmp_path / "ckpt")]
    broken = _job(resumed, "--workers", "2", *ckpt, *where, env=fault)
    assert broken.returncode != 0 and "injected fault on rank 1 at step 3" in broken.stderr
    again = _job(resumed, "--workers", "2", *ckpt, *where, env=fault)
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = _report(whole), _report(resumed)
    assert b["resumed_from_step"] == 2 and a["resumed_from_step"] == 0
    _same_training(a, b)
