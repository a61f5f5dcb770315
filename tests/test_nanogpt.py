"""The nanoGPT recipe of docs/training-loops.md, run as nanoGPT runs: its train.py loop shape under torchrun
(DDP with dlion.attach, accumulation, GradScaler.unscale_ and clip_grad_norm_, a checkpoint
saved by rank 0), stopped and resumed, ends with the uninterrupted run's parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("nanogpt_loop.py")


def _launch(out: Path, iters: int, *resume: str) -> list[dict[str, object]]:
    out.mkdir(exist_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*torchrun, str(SCRIPT), str(out), str(iters), *resume],
        capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"final-rank{r}.pt", weights_only=True) for r in range(2)]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.int32), y.view(torch.int32)) for x, y in zip(a, b, strict=True))


@pytest.mark.timeout(600)
def test_nanogpt_loop_resumed_per_rank_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    whole = _launch(tmp_path / "whole", 6)
    _launch(tmp_path / "half", 3)
    resumed = _launch(tmp_path / "half", 6, "resume")
    for r in range(2):
        # clip_grad_norm_ changes the gradients after backward: attach voted in step().
        assert whole[r]["vote_in_step"] is True and resumed[r]["vote_in_step"] is True
        assert _equal(resumed[r]["params"], whole[r]["params"]), r  # type: ignore[arg-type]
    assert _equal(whole[0]["params"], whole[1]["params"])  # type: ignore[arg-type]
