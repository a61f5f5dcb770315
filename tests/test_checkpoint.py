"""Checkpoints: each rank's own momentum, restored so a resumed run equals an unbroken one."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dlion.ledger import CollectiveRecord, Ledger, Traffic
from dlion.train.checkpoint import MODEL_FILE, rank_file
from dlion.train.faults import CHECKPOINT_KILL, FAULT_KIND_ENV, FAULT_ONCE_ENV, FAULT_RANK_ENV, FAULT_STEP_ENV
from dlion.worker.baselines.dgc import DGC
from dlion.worker.lion.distributed_lion import DistributedLion

from test_train import TINY, _run

RESUME = ["--checkpoint-every", "2"]


def _job(tmp: Path, name: str, workers: int, *extra: str, env: dict[str, str] | None = None) -> Any:
    cmd = [sys.executable, "-m", "dlion", "train", "--workers", str(workers), "--optimizer", "dlion-mavo"]
    return _run([*cmd, *TINY, *RESUME, *extra, "--out", str(tmp / name)], env=env)


def _report(tmp: Path, name: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((tmp / name / "report.json").read_text())
    return report


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An unbroken 2-worker run with checkpoints, shared by the tests below: its folder
    holds the run's report (whole/) and its checkpoints (whole-ckpt/)."""
    tmp = tmp_path_factory.mktemp("whole")
    proc = _job(tmp, "whole", 2, "--checkpoint-dir", str(tmp / "whole-ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def test_resumed_run_equals_an_unbroken_one_bit_for_bit(tmp_path: Path, whole: Path) -> None:
    """Killed after the step-2 checkpoint, resumed: the same parameters, losses and votes."""
    ckpt = tmp_path / "ckpt"
    fault = {FAULT_RANK_ENV: "1", FAULT_STEP_ENV: "3", FAULT_ONCE_ENV: str(tmp_path / "fired")}
    broken = _job(tmp_path, "resumed", 2, "--checkpoint-dir", str(ckpt), env=fault)
    assert broken.returncode != 0 and "injected fault on rank 1 at step 3" in broken.stderr
    assert (ckpt / "latest").read_text().strip() == "step-00000002"
    # Each rank's momentum is its own, saved by that rank.
    step2 = ckpt / "step-00000002"
    m = [
        torch.load(step2 / rank_file(r), weights_only=True)["optimizer"]["state"][0]["exp_avg"]
        for r in (0, 1)
    ]
    assert not torch.equal(m[0], m[1])
    assert sorted(p.name for p in step2.iterdir()) == [MODEL_FILE, rank_file(0), rank_file(1)]
    resumed = _job(tmp_path, "resumed", 2, "--checkpoint-dir", str(ckpt), env=fault)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a, b = _report(whole, "whole"), _report(tmp_path, "resumed")
    assert b["resumed_from_step"] == 2 and a["resumed_from_step"] == 0
    assert b["param_sha256"] == a["param_sha256"]
    assert b["train_loss"] == a["train_loss"] and b["val_loss"] == a["val_loss"]
    # The ledger carries over; the resumed workers check each other's fingerprint once more.
    sa, sb = a["step_bytes"], b["step_bytes"]
    assert sb[:2] == sa[:2] and sb[3:] == sa[3:] and sb[2][0] > sa[2][0]


def test_torchrun_max_restarts_resumes_a_killed_rank_bit_for_bit(tmp_path: Path, whole: Path) -> None:
    """torchrun restarts the job after rank 1 is SIGKILLed at step 3; the new attempt resumes
    from the step-2 checkpoint (in its own store key space: dlion.train.dist) and ends with
    the unbroken run's parameters."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "resumed"
    fault = {
        FAULT_RANK_ENV: "1",
        FAULT_STEP_ENV: "3",
        FAULT_KIND_ENV: "kill",
        FAULT_ONCE_ENV: str(tmp_path / "fired"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["--max-restarts", "1", "-m", "dlion.train", "--optimizer", "dlion-mavo", *TINY, *RESUME]
    proc = _run([*cmd, "--checkpoint-dir", str(ckpt), "--out", str(out)], env=fault)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "fired").exists()  # the kill happened
    a, b = _report(whole, "whole"), _report(tmp_path, "resumed")
    assert b["resumed_from_step"] == 2
    assert b["param_sha256"] == a["param_sha256"] and b["val_loss"] == a["val_loss"]


def test_resume_refuses_another_job(tmp_path: Path, whole: Path) -> None:
    ckpt = whole / "whole-ckpt"  # written by 2 workers at d_model 32
    assert (ckpt / "latest").is_file()
    more = _job(tmp_path, "b", 3, "--checkpoint-dir", str(ckpt))
    assert more.returncode != 0 and "written by 2 workers, this job has 3" in more.stderr
    wider = _job(tmp_path, "c", 2, "--d-model", "64", "--checkpoint-dir", str(ckpt))
    assert wider.returncode != 0 and "d_model: checkpoint 32, now 64" in wider.stderr


def test_ledger_state_round_trips() -> None:
    ledger = Ledger(n_params=10)
    ledger.begin_step()
    ledger.record(
        CollectiveRecord("bucket0", "all_gather", 2, Traffic(payload=16, padding=8), Traffic(metadata=3))
    )
    ledger.end_step()
    ledger.record_extra(CollectiveRecord("hello", "send", 2, Traffic(metadata=64), Traffic()))
    state = ledger.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    back = Ledger(n_params=10)
    back.load_state_dict(torch.load(buf, weights_only=True))  # plain values only
    assert back.steps == ledger.steps and back.extra == ledger.extra and back.summary() == ledger.summary()
    with pytest.raises(ValueError, match="counts 10 parameters, this optimizer has 11"):
        Ledger(n_params=11).load_state_dict(state)


def test_ledger_keeps_totals_of_every_step_and_records_of_the_last() -> None:
    """A long run holds the last records only; totals and per-step bytes still cover every
    step, equal to an unbounded ledger's, and survive a checkpoint round trip."""
    whole, recent = Ledger(n_params=100), Ledger(n_params=100, keep_records=3)
    for step in range(50):
        for ledger in (whole, recent):
            ledger.begin_step()
            for k in range(1 + step % 3):
                sent = Traffic(payload=8 * (step + k), metadata=32)
                ledger.record(CollectiveRecord(f"bucket{k}", "all_gather", 4, sent, sent * 3))
            ledger.end_step()
    assert len(whole.steps) == 50 and recent.steps == whole.steps[-3:]
    assert recent.summary() == whole.summary() and recent.step_bytes() == whole.step_bytes()
    sent = sum(r.sent.bits for recs in whole.steps for r in recs) // 8
    assert recent.summary()["bytes_sent"] == sent == sum(s for s, _ in recent.step_bytes())
    back = Ledger(n_params=100, keep_records=3)
    back.load_state_dict(recent.state_dict())
    assert back.summary() == whole.summary() and back.step_bytes() == whole.step_bytes()


@pytest.mark.parametrize("kind", ["dlion", "dgc"])
def test_lr_scheduler_drives_the_optimizer_after_load_state_dict(kind: str) -> None:
    """torch.optim swaps its param-group dicts on load; the step must read the new ones."""
    p = torch.nn.Parameter(torch.ones(4, 4))
    opt: Any = DistributedLion([p], lr=0.1) if kind == "dlion" else DGC([p], lr=0.1)
    p.grad = torch.ones(4, 4)
    opt.step()
    fresh: Any = DistributedLion([p], lr=0.1) if kind == "dlion" else DGC([p], lr=0.1)
    fresh.load_state_dict(opt.state_dict())
    fresh.param_groups[0]["lr"] = 0.0  # what a scheduler does
    before = p.detach().clone()
    p.grad = torch.ones(4, 4)
    fresh.step()
    moved = p.detach() - before
    # lr 0: only nothing moves (weight decay is scaled by lr too).
    assert torch.equal(moved, torch.zeros_like(moved)), moved


def test_killed_while_writing_a_checkpoint_resumes_from_the_one_before(tmp_path: Path, whole: Path) -> None:
    """Rank 1 is SIGKILLed right after writing its step-4 files, before the ranks agree on
    them: `latest` still names step 2, and the resumed run equals the unbroken one."""
    ckpt = tmp_path / "ckpt"
    fault = {FAULT_RANK_ENV: "1", FAULT_STEP_ENV: "4", FAULT_KIND_ENV: CHECKPOINT_KILL}
    fault[FAULT_ONCE_ENV] = str(tmp_path / "fired")
    broken = _job(tmp_path, "resumed", 2, "--checkpoint-dir", str(ckpt), env=fault)
    assert broken.returncode != 0 and "worker rank 1 was killed by SIGKILL" in broken.stderr, broken.stderr
    assert (ckpt / "latest").read_text().strip() == "step-00000002"
    assert (ckpt / "step-00000004" / rank_file(1)).is_file()  # written, but never made the latest
    resumed = _job(tmp_path, "resumed", 2, "--checkpoint-dir", str(ckpt), env=fault)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _report(whole, "whole"), _report(tmp_path, "resumed")
    assert b["resumed_from_step"] == 2 and b["param_sha256"] == a["param_sha256"]
    assert b["val_loss"] == a["val_loss"]
