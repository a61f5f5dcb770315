"""Numba's kernels run as many threads as torch has (an exported NUMBA_NUM_THREADS wins) and
starting them leaves torch's count alone; the threads benchmark runs (python -m bench.threads).

Each check runs in a fresh interpreter: Numba's threading layer starts once per process, and
the environment it starts in is what is under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.threads import THREAD_VARS

ROOT = Path(__file__).resolve().parents[1]

# A script that, like a training script, runs torch before the optimizer's first kernel.
PRELUDE = """
import json, threading
import numba, numpy as np, torch
from dlion.kernels import lion_sign_step, majority_vote

def kernels():
    g = np.linspace(-1, 1, 1 << 16, dtype=np.float32)
    lion_sign_step(g, np.zeros_like(g), np.empty(g.size // 8, np.uint8), 0.9, 0.99, 7)
    majority_vote(np.zeros((3, 1 << 12), np.uint8))
    return {"numba": numba.get_num_threads(), "torch": torch.get_num_threads()}

torch.ones(1 << 16).sum()
"""


def _run(script: str, **env: str) -> dict[str, Any]:
    clean = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    clean["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + script],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_kernels_run_as_many_threads_as_torch_has() -> None:
    seen = _run(
        """
torch.set_num_threads(1)
one = kernels()
out = {}
t = threading.Thread(target=lambda: out.update(kernels()))  # Numba's count is per thread
t.start(); t.join()
torch.set_num_threads(2)
print(json.dumps({"one": one, "other_thread": out, "two": kernels(), "max": numba.config.NUMBA_NUM_THREADS}))
"""
    )
    assert seen["one"] == {"numba": 1, "torch": 1}
    assert seen["other_thread"] == {"numba": 1, "torch": 1}
    assert seen["two"] == {"numba": min(2, seen["max"]), "torch": 2}


def test_starting_numba_leaves_torchruns_one_thread() -> None:
    """torchrun exports OMP_NUM_THREADS=1; Numba's OpenMP layer, once started, used to set
    OpenMP's count (which torch reads) to NUMBA_NUM_THREADS, every core."""
    seen = _run("print(json.dumps(kernels()))", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2")
    assert seen == {"numba": 2, "torch": 1}  # the exported NUMBA_NUM_THREADS wins for Numba
    assert _run("print(json.dumps(kernels()))", OMP_NUM_THREADS="1") == {"numba": 1, "torch": 1}


def test_an_exported_numba_num_threads_wins() -> None:
    seen = _run("torch.set_num_threads(1); print(json.dumps(kernels()))", NUMBA_NUM_THREADS="3")
    assert seen == {"numba": 3, "torch": 1}


def _bench(tmp_path: Path, *args: str) -> tuple[list[dict[str, Any]], str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.threads", *args, "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows: list[dict[str, Any]] = json.loads((tmp_path / "threads.json").read_text())["rows"]
    assert (tmp_path / "threads.md").read_text().strip() in proc.stdout
    for r in rows:
        timed = [v for k, v in r.items() if k.endswith("_ms")]
        assert timed and all(v >= 0 for v in timed) and r["lion_step_ms"] > 0 and r["adamw_step_ms"] > 0, r
    return rows, proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_run(tmp_path: Path) -> None:
    rows, out = _bench(tmp_path, "--quick")
    by_env = {r["env"]: r for r in rows if r["launcher"] == "torchrun"}
    assert set(by_env) == {"default", "tuned"}
    # torchrun's OMP_NUM_THREADS=1 holds for torch and Numba alike in the user's environment.
    assert (by_env["default"]["torch_threads"], by_env["default"]["numba_threads"]) == (1, 1)
    assert all(r["ddp_iter_ms"] > 0 and r["lion_iter_ms"] > 0 for r in by_env.values())
    assert "| torchrun | default | 1 / 1 |" in out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_full_run(tmp_path: Path) -> None:
    rows, _ = _bench(tmp_path)
    assert {(r["launcher"], r["env"]) for r in rows} == {
        (launcher, env) for launcher in ("spawn", "torchrun") for env in ("default", "tuned")
    }
    for r in rows:
        if r["env"] == "default":  # never more Numba threads than torch was given
            assert 1 <= r["numba_threads"] <= r["torch_threads"], r
