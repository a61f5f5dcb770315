"""Resuming DistributedLion from saved optimizer state: each rank's momentum is its own, so a
resumed run equals the uninterrupted one only if every rank loads its own state. Plain
optimizers on 2 Gloo ranks (a file per rank, and the gathered state), the refusals, bf16
parameters, and the Hugging Face and Lightning callbacks under torchrun."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dlion
from dlion import DistributedLion
from dlion.worker.core.saved_state import GATHERED, STATE_FILE

from multiproc import run_ok

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(8, 9), (33,), (5,)]
K = 3  # steps before the save; as many after


def _params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _opt(params: list[torch.nn.Parameter]) -> DistributedLion:
    # Two ranks split often: the tie's coin, keyed by the step counter, decides those.
    return DistributedLion(params, lr=0.01, weight_decay=0.1)


def _train(opt: DistributedLion, params: list[torch.nn.Parameter], rank: int, steps: range) -> None:
    for step in steps:
        gen = torch.Generator().manual_seed(1000 * step + rank)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()


def _resumed(rank: int, params: list[torch.Tensor], load: Any) -> list[torch.Tensor]:
    """From the parameters at step K, a fresh optimizer, ``load(optimizer)``, K more steps."""
    again = [torch.nn.Parameter(p.clone()) for p in params]
    fresh = _opt(again)
    load(fresh)
    _train(fresh, again, rank, range(K, 2 * K))
    return [p.detach().clone() for p in again]


def _save_and_resume(rank: int, world: int, folder: str, how: str) -> dict[str, Any]:
    params = _params()
    opt = _opt(params)
    _train(opt, params, rank, range(K))
    out: dict[str, Any] = {"momentum": opt.state[params[0]]["exp_avg"].clone()}
    if how == "files":
        written = dlion.save_optimizer_state(opt, folder)
        source = folder
        out["file"] = written.name
    else:
        gathered = dlion.gather_optimizer_state(opt)
        source = str(Path(folder) / "gathered.pt")
        out["gathered"] = gathered
        if rank == 0:
            torch.save(gathered, source)
        dist.barrier()  # the file is whole before any rank reads it
    at_k = [p.detach().clone() for p in params]
    _train(opt, params, rank, range(K, 2 * K))
    out["whole"] = [p.detach().clone() for p in params]
    out["resumed"] = _resumed(rank, at_k, lambda o: dlion.load_optimizer_state(o, source))

    def rank0_everywhere(o: DistributedLion) -> None:
        """What Hugging Face did: rank 0's state loaded on every rank (its rank rewritten, to pass)."""
        state = torch.load(Path(folder) / STATE_FILE.format(rank=0, world=world), weights_only=True)
        state["dlion"]["rank"] = rank
        o.load_state_dict(state)

    if how == "files":
        out["rank0_everywhere"] = _resumed(rank, at_k, rank0_everywhere)
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("how", ["files", "gathered"])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path: Path, how: str) -> None:
    ranks = run_ok(_save_and_resume, 2, folder=str(tmp_path), how=how)
    assert not torch.equal(ranks[0]["momentum"], ranks[1]["momentum"])  # each rank's own
    for r in ranks:
        assert _same(r["resumed"], r["whole"])
    assert _same(ranks[0]["whole"], ranks[1]["whole"])
    if how == "files":
        assert [r["file"] for r in ranks] == [STATE_FILE.format(rank=i, world=2) for i in (0, 1)]
        # Rank 0's momentum on every rank: the ranks stay equal, but the run is another one.
        assert not _same(ranks[0]["rank0_everywhere"], ranks[0]["whole"])
    else:
        gathered = ranks[0]["gathered"]
        assert ranks[1]["gathered"] is None and len(gathered[GATHERED]) == 2
        saved = [s["state"][0]["exp_avg"] for s in gathered[GATHERED]]
        assert all(m.device.type == "cpu" for m in saved)
        assert torch.equal(saved[0], ranks[0]["momentum"]) and torch.equal(saved[1], ranks[1]["momentum"])


def _refusals(rank: int, world: int, folder: str, alone: dict[str, Any]) -> dict[str, Any]:
    params = _params()
    opt = _opt(params)
    _train(opt, params, rank, range(2))
    dlion.save_optimizer_state(opt, folder)
    errors = {}
    other = torch.load(Path(folder) / STATE_FILE.format(rank=1 - rank, world=world), weights_only=True)
    for name, state in (
        ("other rank", other),
        ("one process", alone),
        ("gathered of one", {GATHERED: [alone]}),
    ):
        try:
            _opt(_params()).load_state_dict(state)
            errors[name] = ""
        except ValueError as err:
            errors[name] = str(err)
    return {"errors": errors, "state": opt.state_dict(), "gathered": dlion.gather_optimizer_state(opt)}


def test_load_refuses_another_ranks_state_or_another_world_size(tmp_path: Path) -> None:
    single = _params()
    alone_opt = _opt(single)
    _train(alone_opt, single, 0, range(2))
    alone = alone_opt.state_dict()
    folder = tmp_path / "two"
    ranks = run_ok(_refusals, 2, folder=str(folder), alone=alone)
    for rank, r in enumerate(ranks):
        errors = r["errors"]
        assert f"saved by rank {1 - rank} of 2, this optimizer is rank {rank} of 2" in errors["other rank"]
        assert "dlion.save_optimizer_state" in errors["other rank"]  # says what to do
        assert f"saved by rank 0 of 1, this optimizer is rank {rank} of 2" in errors["one process"]
        assert "resume at world size 1" in errors["one process"]
        assert "the gathered state holds 1 ranks' states, this job has 2" in errors["gathered of one"]
    # And in one process, the 2-rank states: rank 1's, the gathered one, the folder.
    with pytest.raises(ValueError, match=r"saved by rank 1 of 2, this optimizer is rank 0 of 1 \(no torch"):
        _opt(_params()).load_state_dict(ranks[1]["state"])
    with pytest.raises(ValueError, match="the gathered state holds 2 ranks' states, this job has 1"):
        _opt(_params()).load_state_dict(ranks[0]["gathered"])
    with pytest.raises(
        ValueError, match="no optimizer state for rank 0 of 1, only dlion-optimizer-rank0-of-2"
    ):
        dlion.load_optimizer_state(_opt(_params()), folder)
    # A single process's own state, and its gathered state, load.
    _opt(_params()).load_state_dict(alone)
    _opt(_params()).load_state_dict(dlion.gather_optimizer_state(alone_opt) or {})


def test_bf16_parameters_keep_fp32_momentum_through_a_load() -> None:
    params = _params(torch.bfloat16)
    opt = _opt(params)
    _train(opt, params, 0, range(K))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    at_k = [p.detach().clone() for p in params]
    _train(opt, params, 0, range(K, 2 * K))

    again = [torch.nn.Parameter(p.clone()) for p in at_k]
    fresh = _opt(again)
    fresh.load_state_dict(saved)
    for i, p in enumerate(again):
        m = fresh.state[p]["exp_avg"]
        assert m.dtype == torch.float32 and torch.equal(m, saved["state"][i]["exp_avg"])
    _train(fresh, again, 0, range(K, 2 * K))
    assert _same(again, [p.detach() for p in params])


# ---- Hugging Face and Lightning under torchrun (tests/frameworks_job.py)

MISSING = [m for m in ("transformers", "lightning") if importlib.util.find_spec(m) is None]
needs_frameworks = pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)}")


def _torchrun(mode: str, out: Path) -> list[dict[str, Any]]:
    out.mkdir()
    job = ROOT / "tests" / "frameworks_job.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        [*cmd, str(job), mode, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@needs_frameworks
@pytest.mark.timeout(400)
@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_a_framework_resumes_the_uninterrupted_run(tmp_path: Path, framework: str) -> None:
    """Checkpointed at step K by the framework (with the callback), resumed in a fresh Trainer:
    at step 2K the parameters are the uninterrupted run's, bit for bit, on both ranks."""
    ranks = _torchrun(f"{framework}-resume", tmp_path / framework)
    for r in ranks:
        assert r["steps"] == [2 * r["resume_at"], 2 * r["resume_at"]]
        assert r["resumed"] == r["whole"], framework
    assert ranks[0]["whole"] == ranks[1]["whole"]


@needs_frameworks
@pytest.mark.timeout(400)
def test_hf_early_stop_with_local_steps_ends_on_the_best_model(tmp_path: Path) -> None:
    """dlion-local stopped by an evaluation in the middle of a round, load_best_model_at_end:
    the open round ends before the Trainer loads its best checkpoint, so both ranks end on
    that checkpoint's model, not moved by a vote after the load; with a checkpoint right
    after the stopping evaluation and without one."""
    ranks = _torchrun("hf-early", tmp_path / "early")
    for case, stop, best in (("saved_at_stop", 6, None), ("not_saved_at_stop", 9, "checkpoint-6")):
        a, b = (r[case] for r in ranks)
        assert a["steps"] == b["steps"] == stop, case
        assert a["rounds"] == b["rounds"] == 2, case  # one whole round, and the one cut short
        assert best is None or a["best_checkpoint"] == best, (case, a["best_checkpoint"])
        assert a["params"] == b["params"] == a["best"] == b["best"], case


@needs_frameworks
def test_hf_create_optimizer_takes_lions_betas_not_adams(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from dlion.integrations.hf import create_optimizer

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], weight_decay=0.1)
    net = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    trainer = Trainer(net, args)
    assert (args.adam_beta1, args.adam_beta2) == (0.9, 0.999)
    assert all(g["betas"] == (0.9, 0.99) for g in create_optimizer(trainer).param_groups)
    assert all(g["betas"] == (0.95, 0.98) for g in create_optimizer(trainer, betas=(0.95, 0.98)).param_groups)


def test_a_wrapped_optimizers_state_keeps_its_dtype_through_a_load() -> None:
    """lion-global wraps dlion.Lion, whose momentum is fp32 for bf16 parameters: the wrapper's
    load keeps it fp32 (torch's own load would cast it to bf16); AdamW's step stays on the host."""
    from dlion.worker.catalogue import build_optimizer

    for name, key in (("lion-global", "exp_avg"), ("adamw-global", "exp_avg")):
        params = _params(torch.bfloat16)
        opt = build_optimizer(name, params, lr=1e-3, weight_decay=0.0)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        saved = opt.state_dict()
        again = [torch.nn.Parameter(p.detach().clone()) for p in params]
        fresh = build_optimizer(name, again, lr=1e-3, weight_decay=0.0)
        fresh.load_state_dict(saved)
        for i, p in enumerate(again):
            got, want = fresh.state[p][key], saved["state"][i][key]
            assert got.dtype == want.dtype and torch.equal(got, want), name
            if "step" in saved["state"][i]:
                assert fresh.state[p]["step"].device.type == "cpu"
