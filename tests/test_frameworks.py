"""Hugging Face Trainer, Lightning and Accelerate, each training a tiny GPT-2 on 2 Gloo ranks
with DistributedLion attached to its DDP model: parameters identical on both ranks, loss falls,
and the wire carries D-Lion's bits, not fp32. The wire is measured, not taken from the ledger:
the ranks run in a network namespace of their own, and the job reads its loopback counter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from loopback import FRAMEWORK_MARKS, namespace_fixture

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "frameworks_job.py"
FRAMEWORKS = ("hf", "lightning", "accelerate")


pytestmark = FRAMEWORK_MARKS


namespace = namespace_fixture("dlion-fw")


def _run(ns: str, framework: str, out: Path) -> list[dict[str, Any]]:
    out.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = ["ip", "netns", "exec", ns, *torchrun, str(JOB), framework, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _wire_per_step(ranks: list[dict[str, Any]]) -> float:
    from frameworks_job import FROM, TO

    lo = ranks[0]["lo"]
    return (lo[str(TO)] - lo[str(FROM)]) / (TO - FROM)


def test_frameworks_train_with_dlion_bits_on_the_wire(namespace: str, tmp_path: Path) -> None:
    from frameworks_job import FROM, TO

    fp32 = _run(namespace, "ddp-fp32", tmp_path / "fp32")
    fp32_wire = _wire_per_step(fp32)
    n = fp32[0]["n_params"]
    assert fp32_wire >= 2 * 4 * n  # 2 ranks x a ring all-reduce of fp32: (N-1)/N x 2 x 4 bytes each
    rows = {}
    for fw in FRAMEWORKS:
        ranks = _run(namespace, fw, tmp_path / fw)
        assert ranks[0]["params"] == ranks[1]["params"], fw  # no rank holds another model
        losses = ranks[0]["losses"]
        assert len(losses) == TO and losses[-1] < losses[0] - 1.0, (fw, losses)
        wire = _wire_per_step(ranks)
        ledger = sum(sum(r["step_bytes"][s][0] for s in range(FROM, TO)) for r in ranks) / (TO - FROM)
        rows[fw] = (wire, ledger, fp32_wire / wire)
        # The loopback carries the ledger's bytes, plus TCP/IP headers, a barrier and the
        # framework's own metrics (HF gathers the logged loss): 32x fewer than fp32, near enough.
        assert ledger <= wire <= 1.15 * ledger, (fw, wire, ledger)
        assert fp32_wire / wire > 28, (fw, fp32_wire, wire)
    shown = [f"{fw}: {w:,.0f} B/step, ledger {led:,.0f}, {r:.1f}x fewer" for fw, (w, led, r) in rows.items()]
    print(f"\nfp32 DDP: {fp32_wire:,.0f} B/step; " + "; ".join(shown))


def test_frameworks_train_with_local_steps(namespace: str, tmp_path: Path) -> None:
    """dlion-local (H = 5) through the Hugging Face and Lightning callbacks: the ranks meet only
    at the rounds' ends, the partial last round ends with training, and no rank ends with a
    model of its own."""
    from frameworks_job import STEPS

    for fw in ("hf-local", "lightning-local"):
        ranks = _run(namespace, fw, tmp_path / fw)
        assert ranks[0]["params"] == ranks[1]["params"], fw
        losses = ranks[0]["losses"]
        assert len(losses) == STEPS and losses[-1] < losses[0] - 1.0, (fw, losses)
        sent = [s for s, _ in ranks[0]["step_bytes"]]
        assert [s > 0 for s in sent] == [(k + 1) % 5 == 0 or k == STEPS - 1 for k in range(STEPS)], (fw, sent)
