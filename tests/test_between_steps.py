"""What users do between backward and step() reaches the vote, or is refused on every rank:
gradient clipping and GradScaler's loss scaling, under dlion.attach (DDP) and without it,
each run against plain DistributedLion with the same loop, bit for bit, on 2 and 3 Gloo ranks."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ddp_hook import _bits_equal, _model
from test_resume import _torchrun as torchrun

from multiproc import run_ok, run_ranks

STEPS = 5


def _loop(
    rank: int,
    world: int,
    *,
    ddp: bool,
    clip: float = 0.0,
    clip_from: int = 0,
    scaler: bool = False,
    unscale: bool = False,
    inf_step: int = -1,
    micro: int = 1,
    vote_in_step: bool | None = None,
    overlap: bool = False,
    autocast: bool = False,
    flat: bool = False,
) -> dict[str, Any]:
    """A training loop as users write it: accumulation under no_sync, loss scaling, clipping."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dlion

    if flat:  # flat buckets in Numba's CUDA simulator: the ranks agree on the device
        from test_flat_runner import _flat_everywhere

        _flat_everywhere()

    model = _model()
    opt = dlion.DistributedLion(
        model.parameters(), lr=0.01, weight_decay=0.1, backend="sharded", bucket_numel=128, overlap=overlap
    )
    net: torch.nn.Module = model
    handle = None
    if ddp:
        net = DDP(model, bucket_cap_mb=0.0006)
        handle = dlion.attach(net, opt, vote_in_step=vote_in_step)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaler else None
    gen = torch.Generator().manual_seed(100 + rank)
    launched, norms = [], []
    for step in range(STEPS):
        for m in range(micro):
            x, y = torch.randn(8, 9, generator=gen), torch.randn(8, 3, generator=gen)
            last = m == micro - 1
            with (
                net.no_sync() if ddp and not last else contextlib.nullcontext(),  # type: ignore[operator]
                torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext(),
            ):
                loss = torch.nn.functional.mse_loss(net(x), y) / micro
            (sc.scale(loss) if sc is not None else loss).backward()
        if step == inf_step and rank == 1:
            model[0].weight.grad[0, 0] = float("inf")  # type: ignore[index]
        launcher = opt.launching.launcher
        launched.append(launcher._next if launcher is not None else -1)  # buckets voted in backward
        if sc is not None and unscale:
            sc.unscale_(opt)
        if clip and step >= clip_from:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
        if sc is not None:
            sc.step(opt)
            sc.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "momenta": [opt.state[p]["exp_avg"].clone() for p in model.parameters()],
        "skipped": opt.skipped_steps,
        "launched": launched,
        "vote_in_step": handle.vote_in_step if handle is not None else None,
        "scale": float(sc.get_scale()) if sc is not None else 1.0,
        "norms": norms,
        "start": [r.name for r in opt.ledger.extra if r.name.startswith("start")],
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return _bits_equal(a["params"], b["params"]) and _bits_equal(a["momenta"], b["momenta"])


@pytest.mark.parametrize(
    ("world", "kw"),
    [
        (2, {"clip": 0.05}),  # clip_grad_norm_ every step, as nanoGPT and Hugging Face do
        (3, {"clip": 0.05, "micro": 3}),  # with accumulation under no_sync
        (2, {"clip": 0.05, "vote_in_step": True}),
        (2, {"scaler": True}),  # GradScaler: scaled gradients reach step(), unscaled there
        (2, {"scaler": True, "unscale": True, "clip": 0.05}),  # unscale_, clip, step
        (3, {"scaler": True, "inf_step": 2}),  # an overflow on one rank skips it on all
        (3, {"scaler": True, "inf_step": 0}),  # at the learning step: skipped, learnt next step
    ],
)
def test_attach_with_what_runs_between_backward_and_step_equals_plain(world: int, kw: dict[str, Any]) -> None:
    hooked = run_ok(_loop, world, ddp=True, **kw)
    plain = run_ok(_loop, world, ddp=False, **kw)
    for a, b in zip(hooked, plain, strict=True):
        assert _same(a, b), kw
        assert a["skipped"] == b["skipped"] == (1 if "inf_step" in kw else 0)
        # The loop changes gradients after backward: every vote ran in step().
        assert a["vote_in_step"] is True and all(n <= 0 for n in a["launched"]), a["launched"]
        # DDP broadcast the model at wrap: dlion checked it, and sent nothing more.
        assert set(a["start"]) == {"start check"}, a["start"]  # checksums only, no broadcast
    assert _bits_equal(hooked[0]["params"], hooked[-1]["params"])  # momenta are each rank's own
    if kw.get("clip"):
        assert max(max(r["norms"]) for r in plain) > kw["clip"]  # clipping was not a no-op
        unclipped = run_ok(_loop, world, ddp=True, **{**kw, "clip": 0.0})
        assert not _bits_equal(unclipped[0]["params"], hooked[0]["params"])


def test_a_loop_that_changes_nothing_still_votes_in_backward() -> None:
    hooked = run_ok(_loop, 2, ddp=True, scaler=False)
    for r in hooked:
        assert r["vote_in_step"] is False and r["launched"][0] == 0 and min(r["launched"][1:]) > 0


def test_loss_scaling_equals_unscaled_training_and_an_overflow_skips_every_rank() -> None:
    """A power-of-two loss scale is exact: the scaled run equals the unscaled one bit for bit,
    and its momentum holds unscaled gradients. An overflow on rank 1 skips the step on every
    rank (the scaler used to skip step() on rank 1 alone, and the ranks fell out of step)."""
    scaled = run_ok(_loop, 2, ddp=False, scaler=True)
    plain = run_ok(_loop, 2, ddp=False)
    for a, b in zip(scaled, plain, strict=True):
        assert _same(a, b)
    overflow = run_ok(_loop, 3, ddp=False, scaler=True, inf_step=2)
    assert all(r["skipped"] == 1 for r in overflow)
    assert all(_bits_equal(overflow[0]["params"], r["params"]) for r in overflow)
    # Each rank's scaler saw its own overflow: rank 1 halved its scale, the others did not.
    assert overflow[1]["scale"] == overflow[0]["scale"] / 2 == overflow[2]["scale"] / 2


def test_bf16_autocast_under_attach_equals_plain() -> None:
    hooked = run_ok(_loop, 2, ddp=True, autocast=True, clip=0.05)
    plain = run_ok(_loop, 2, ddp=False, autocast=True, clip=0.05)
    for a, b in zip(hooked, plain, strict=True):
        assert _same(a, b)


@pytest.mark.parametrize(
    "kw",
    [
        {"ddp": True, "clip": 0.05, "vote_in_step": False},  # told to vote in backward
        {"ddp": True, "clip": 0.05, "clip_from": 2},  # learned at step 1; clipping began later
        {"ddp": False, "clip": 0.05, "overlap": True},  # overlap=True votes in backward too
        {"ddp": True, "clip": 0.05, "vote_in_step": False, "flat": True},  # agreed on the device
    ],
)
def test_a_gradient_changed_after_its_vote_began_raises_on_every_rank(kw: dict[str, Any]) -> None:
    out = run_ranks(_loop, 2, timeout_s=120, **kw)
    for status, value in out:
        assert status == "error", value
        assert "GradientChangedError" in value and "changed after its vote began" in value, value
        assert f"(step {kw.get('clip_from', 0)})" in value, value
        assert "vote_in_step=True" in value


@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate parameters")
def test_a_parameter_listed_twice_is_refused() -> None:
    import dlion

    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"one parameter twice, as parameter #0 \(3,\) and as parameter #1"):
        dlion.DistributedLion([w, w])
    with pytest.raises(ValueError, match="'b'"):
        dlion.DistributedLion([{"params": [w, w], "param_names": ["a", "b"]}])
    with pytest.raises(ValueError, match=r"as parameter 'a' \(3,\) \(#1\)"):
        dlion.DistributedLion([{"params": [w, w], "param_names": ["a", "a"]}])


def test_lightning_16_mixed_clipping_unscales_before_it_clips() -> None:
    """Lightning's 16-mixed refuses to clip for an optimizer that unscales in step(); the
    callback's plugin unscales first, and the result is the unscale-clip-step of plain torch."""
    pl_amp = pytest.importorskip("lightning.pytorch.plugins.precision.amp")
    import dlion
    from dlion.integrations.lightning import unscale_before_clipping

    def run(through_lightning: bool) -> list[torch.Tensor]:
        model = _model()
        opt = dlion.DistributedLion(model.parameters(), lr=0.01, weight_decay=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        plugin = pl_amp.MixedPrecision("16-mixed", "cuda", scaler=scaler)  # built, never run on CUDA
        if through_lightning:
            with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
                plugin.clip_gradients(opt, clip_val=0.05)
            unscale_before_clipping(plugin)
        for step in range(3):
            x = torch.randn(8, 9, generator=torch.Generator().manual_seed(step))
            scaler.scale(model(x).pow(2).mean()).backward()
            if through_lightning:
                plugin.clip_gradients(opt, clip_val=0.05)
            else:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    assert _bits_equal(run(True), run(False))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_a_frameworks_clipping_reaches_the_vote(tmp_path: Path, framework: str) -> None:
    """HF's max_grad_norm and Lightning's gradient_clip_val used to change nothing under the
    callback (the vote ran in backward, before the clip): now clipped and unclipped runs differ,
    and the callback told attach to vote in step()."""
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    ranks = torchrun(f"{framework}-clip", tmp_path / framework)
    for r in ranks:
        assert r["clipped"] != r["free"], framework
        assert r["vote_in_step"] == [True, False], r["vote_in_step"]
    assert ranks[0]["clipped"] == ranks[1]["clipped"]
