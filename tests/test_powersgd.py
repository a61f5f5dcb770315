"""The powersgd baseline: torch's DDP PowerSGD hook and AdamW, its bytes in dlion's ledger."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dlion.train.config import TrainConfig
from dlion.train.model import ByteGPT, ModelConfig
from dlion.worker.baselines.powersgd import PowerSGD, PowerSGDConfig

from test_train import TINY, _run

RANK = 2


def _cost_model(workers: int, start: int, steps: int) -> list[int]:
    """Bytes sent per step: the whole model in fp32 during the warm-up, then vectors and
    small matrices in fp32 plus P and Q; every all-reduce at the ring's 2 (N-1)/N, its
    length rounded up to N whole chunks (the tiny model is one DDP bucket)."""
    model = ByteGPT(ModelConfig(context=32, d_model=32, layers=1, heads=2))
    uncompressed = p_len = q_len = 0
    for p in model.parameters():
        rows, cols = (p.shape[0], p.numel() // p.shape[0]) if p.ndim > 1 else (0, 0)
        if p.ndim > 1 and (rows + cols) * RANK * 2.0 < rows * cols:  # min_compression_rate 2
            p_len, q_len = p_len + rows * RANK, q_len + cols * RANK
        else:
            uncompressed += p.numel()

    def ring(numel: int) -> int:
        padded = -(-numel // workers) * workers
        return 4 * padded * 2 * (workers - 1) // workers

    full = ring(sum(p.numel() for p in model.parameters()))
    compressed = ring(uncompressed) + ring(p_len) + ring(q_len)
    return [full if s < start else compressed for s in range(steps)]


@pytest.mark.parametrize("workers", [2, 3])
def test_job_ledger_matches_the_cost_model(tmp_path: Path, workers: int) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dlion", "train", "--workers", str(workers), "--optimizer", "powersgd"]
    proc = _run([*cmd, *TINY, "--powersgd-rank", str(RANK), "--warmup-steps", "2", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["params_identical_across_ranks"] is True
    assert report["final_val_loss"] < report["val_loss"][0][1]
    expect = _cost_model(workers, start=2, steps=5)
    assert [s for s, _ in report["step_bytes"]] == expect
    assert [r for _, r in report["step_bytes"]] == expect
    # DDP's broadcast of rank 0's parameters when it wraps the model: once, beside the steps.
    n = report["n_params"]
    assert report["ledger"]["one_off_bytes_sent"] == 4 * n * (workers - 1)
    assert report["ledger_by_rank"][1]["one_off_bytes_received"] == 4 * n
    assert expect[-1] * 6 < expect[0]  # compression is real


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        PowerSGDConfig(rank=0)
    with pytest.raises(ValueError, match="start_iter must be an int >= 2, got 1"):
        PowerSGDConfig(start_iter=1)
    with pytest.raises(ValueError, match="needs real processes; use --workers"):
        TrainConfig(optimizer="powersgd", virtual_workers=4)
    opt = PowerSGD([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(RuntimeError, match="before wrap"):
        opt.step()
