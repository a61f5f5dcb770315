"""overlap=True (phases 3-5 from gradient hooks) against the plain step, bit for bit, on Gloo."""

from __future__ import annotations

import pytest
import torch

from dlion import DistributedLion

from multiproc import run_ok

STEPS = 5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 7 tensors; an unused head (no gradient) holds its bucket back until step().
    return torch.nn.ModuleDict(
        {
            "a": torch.nn.Linear(9, 16),
            "b": torch.nn.Linear(16, 16),
            "c": torch.nn.Linear(16, 3, bias=False),
            "unused": torch.nn.Linear(3, 3),
        }
    )


def _train(rank: int, world: int, overlap: bool, backend: str, nan_step: int = -1) -> dict[str, object]:
    model = _model()
    opt = DistributedLion(
        model.parameters(), lr=0.01, weight_decay=0.1, backend=backend, overlap=overlap,
        bucket_numel=128, nonfinite="skip",
    )  # fmt: skip
    gen = torch.Generator().manual_seed(100 + rank)
    for step in range(STEPS):
        x, y = torch.randn(8, 9, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        out = model["c"](torch.relu(model["b"](torch.relu(model["a"](x)))))
        loss = torch.nn.functional.mse_loss(out, y)
        if step == nan_step and rank == world - 1:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
    sent, received = opt.ledger.totals()
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "momenta": [opt.state[p]["exp_avg"].clone() for p in model.parameters() if p in opt.state],
        "bits": (sent.bits, received.bits),
        "step_bytes": opt.ledger.step_bytes(),
        "skipped": opt.skipped_steps,
    }


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    for key in ("params", "momenta"):
        xs, ys = a[key], b[key]
        assert isinstance(xs, list) and isinstance(ys, list) and len(xs) == len(ys)
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x.view(torch.int32), y.view(torch.int32)), key
    assert a["bits"] == b["bits"] and a["skipped"] == b["skipped"]


@pytest.mark.parametrize(("backend", "world"), [("allgather", 2), ("sharded", 3)])
def test_overlap_equals_plain_step(backend: str, world: int) -> None:
    plain = run_ok(_train, world, overlap=False, backend=backend)
    overlapped = run_ok(_train, world, overlap=True, backend=backend)
    for a, b in zip(plain, overlapped, strict=True):
        _same(a, b)


def test_overlap_skips_a_nan_step_like_the_plain_step() -> None:
    """The sign step already ran from the hooks; its momentum must not be committed. The
    bits it sent before the ranks learnt of the NaN are on the ledger."""
    plain = run_ok(_train, 2, overlap=False, backend="allgather", nan_step=2)
    overlapped = run_ok(_train, 2, overlap=True, backend="allgather", nan_step=2)
    assert plain[0]["skipped"] == 1
    for a, b in zip(plain, overlapped, strict=True):
        assert a["step_bytes"][2] != b["step_bytes"][2]  # the skipped step
        assert b["step_bytes"][2] == b["step_bytes"][3] == a["step_bytes"][3]  # all of a normal step
        _same({**a, "bits": 0}, {**b, "bits": 0})


def _accumulate(rank: int, world: int) -> str:
    model = torch.nn.Linear(4, 4)
    opt = DistributedLion(model.parameters(), lr=0.01, overlap=True)
    for _ in range(2):  # the first step arms the hooks
        opt.zero_grad()
        model(torch.ones(2, 4)).sum().backward()
        try:
            model(torch.ones(2, 4)).sum().backward()  # a second micro-batch
        except RuntimeError as err:
            return str(err)
        opt.step()
    return "no error"


def test_overlap_refuses_gradient_accumulation() -> None:
    for msg in run_ok(_accumulate, 2):
        assert "one backward per optimizer step" in msg


def test_overlap_needs_a_collective_backend() -> None:
    with pytest.raises(
        ValueError, match=r"overlap=True needs backend 'allgather' or 'sharded'.*got backend='server'"
    ):
        DistributedLion(torch.nn.Linear(2, 2).parameters(), backend="server", overlap=True)
