"""Bad input: a clear error naming the bad value, on every rank, never a hang."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import dlion
from dlion.worker.baselines.global_opt import GlobalOptimizer

from multiproc import run_ok, run_ranks


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"betas": (1.0, 0.99)}, "betas[0]"),
        ({"betas": (0.9,)}, "betas"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"vote": "mean"}, "vote"),
        ({"tie": "up"}, "tie"),
        ({"nonfinite": "ignore"}, "nonfinite"),
        ({"backend": "ring"}, "backend"),
        ({"seed": -3}, "seed"),
        ({"bucket_numel": 4}, "bucket_numel"),
    ],
)
def test_invalid_hyperparameters(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        dlion.DistributedLion([torch.nn.Parameter(torch.zeros(3))], **kwargs)  # type: ignore[arg-type]


def test_lion_rejects_bad_lr() -> None:
    with pytest.raises(ValueError, match="lr"):
        dlion.Lion([torch.nn.Parameter(torch.zeros(3))], lr=-1)


def test_sparse_and_integer_gradients() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    opt = dlion.DistributedLion([("w", p)])
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(TypeError, match=r"sparse.*'w'"):
        opt.step()
    with pytest.raises(TypeError, match="floating-point"):
        dlion.DistributedLion([torch.zeros(3, dtype=torch.int64)])


def test_nonfinite_raises_at_world_size_one() -> None:
    p = torch.nn.Parameter(torch.ones(4))
    opt = dlion.DistributedLion([("layer.weight", p)])
    p.grad = torch.tensor([0.0, float("inf"), 1.0, 2.0])
    with pytest.raises(dlion.NonFiniteGradientError, match=re.escape("layer.weight")):
        opt.step()
    assert torch.equal(p.detach(), torch.ones(4))


def _nan_on_rank1(rank: int, world: int, mode: str, kind: str = "dlion") -> dict[str, object]:
    """Rank 1's second tensor has a NaN: the error, or (skip mode) whether nothing moved, and
    where the next, finite step took the parameters."""
    params = [torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(5))]
    if kind == "dlion":
        opt: Any = dlion.DistributedLion([("a", params[0]), ("b", params[1])], lr=0.1, nonfinite=mode)  # type: ignore[arg-type]
    else:  # the fp32 all-reduce baseline, which would spread the NaN to every rank
        opt = GlobalOptimizer(torch.optim.AdamW(params, lr=0.1), nonfinite=mode)
    params[0].grad = torch.ones(10)
    params[1].grad = torch.full((5,), float("nan") if rank == 1 else 1.0)
    try:
        opt.step()
    except dlion.NonFiniteGradientError as err:
        return {"error": str(err)}
    # skip mode: nothing moved, and the next (finite) step runs normally on all ranks
    unchanged = all(torch.equal(p.detach(), torch.ones_like(p)) for p in params)
    params[1].grad = torch.ones(5)
    opt.step()
    skipped = getattr(opt, "skipped_steps", None)
    return {"unchanged": unchanged, "skipped": skipped, "moved": float(params[0].detach()[0])}


def test_nonfinite_gradient_raises_on_every_rank() -> None:
    out = run_ranks(_nan_on_rank1, 2, mode="raise")
    for status, value in out:
        assert status == "ok"
        assert "rank 1" in value["error"] and "'b'" in value["error"]


def test_nonfinite_gradient_skipped_on_every_rank() -> None:
    out = run_ranks(_nan_on_rank1, 2, mode="skip")
    for status, value in out:
        assert status == "ok", value
        assert value["unchanged"] and value["skipped"] == 1
        assert value["moved"] == pytest.approx(0.9)


def _first_step_error(rank: int, world: int, differ: str) -> str:
    """Rank 1 differs from rank 0 by ``differ``: "tensors" (one more) or "release"."""
    from dlion import version

    shapes = [(4, 3), (3,)] + ([(2,)] if differ == "tensors" and rank == 1 else [])
    if differ == "release" and rank == 1:
        version.VERSION = "0.0.9"
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    return start_error(lambda: dlion.DistributedLion(params), params)


def start_error(build: Callable[[], torch.optim.Optimizer], params: list[torch.nn.Parameter]) -> str:
    """The ValueError that building the optimizer (with the process group there, the ranks
    start then) or its first step with gradients of ones raises, or "no error"."""
    try:
        opt = build()
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    except ValueError as err:
        return str(err)
    return "no error"


def test_mismatched_parameter_lists_fail_on_every_rank() -> None:
    out = run_ranks(_first_step_error, 2, timeout_s=60, differ="tensors")
    for status, value in out:
        assert status == "ok"
        assert "rank 1 tensors=3 vs rank 0 tensors=2" in value


def test_a_rank_on_another_dlion_release_fails_on_every_rank() -> None:
    for value in run_ok(_first_step_error, 2, differ="release"):
        assert "ranks disagree on the dlion release" in value and "rank 1 format+version=" in value, value


def test_global_all_reduce_refuses_a_nonfinite_gradient_on_every_rank() -> None:
    """adamw-global would all-reduce one rank's Inf into every rank's weights: instead every
    rank raises naming it, or with nonfinite="skip" every rank skips the step."""
    for rank_out in run_ok(_nan_on_rank1, 3, mode="raise", kind="global"):
        assert "rank 1, parameter #1 (5,)" in rank_out["error"], rank_out
    skipped = run_ok(_nan_on_rank1, 3, mode="skip", kind="global")
    assert all(r["unchanged"] for r in skipped)
    assert len({r["moved"] for r in skipped}) == 1 and skipped[0]["moved"] < 1.0  # then a real step
    with pytest.raises(ValueError, match="nonfinite must be one of raise, skip; got 'ignore'"):
        GlobalOptimizer(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))]), nonfinite="ignore")


def _one() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    ("name", "option", "message"),
    [
        ("terngrad", {"cautious_wd": True}, "cautious weight decay is an option of lion, dlion-mavo, "),
        ("adamw-global", {"server": object()}, "a dedicated parameter server is an option of dlion-mavo, "),
        ("lion", {"procs_per_node": 2}, "procs_per_node is an option of dlion-mavo, dlion-avg, "),
        ("dgc", {"rank": 8}, "rank is an option of powersgd; got optimizer 'dgc'"),
    ],
)
def test_catalogue_refuses_an_option_its_row_lacks(name: str, option: dict[str, Any], message: str) -> None:
    """Each row takes its own options; one it does not have is named with the rows that do."""
    with pytest.raises(ValueError, match=re.escape(message)):
        dlion.build_optimizer(name, _one(), lr=0.1, weight_decay=0.0, **option)


def test_catalogue_options_are_checked_and_typed() -> None:
    from dlion.worker.catalogue import entry
    from dlion.worker.core.build_args import BuildArgs, VoteOptions

    # Off is not asked for: no row is refused a False or a None.
    assert dlion.build_optimizer("dgc", _one(), lr=0.1, weight_decay=0.0, cautious_wd=False, byzantine=None)
    with pytest.raises(TypeError, match="no optimizer has an option 'cautious'"):
        dlion.build_optimizer("lion", _one(), lr=0.1, weight_decay=0.0, cautious=True)
    with pytest.raises(ValueError, match="cautious_wd must be a bool, got 1"):
        dlion.build_optimizer("lion", _one(), lr=0.1, weight_decay=0.0, cautious_wd=1)
    with pytest.raises(ValueError, match="procs_per_node must be an int >= 1 or None, got 0"):
        VoteOptions(procs_per_node=0)
    with pytest.raises(ValueError, match="PowerSGD rank must be an int >= 1, got 0"):
        dlion.build_optimizer("powersgd", _one(), lr=0.1, weight_decay=0.0, rank=0)
    args = BuildArgs(lr=0.1, weight_decay=0.0, betas=(0.9, 0.99), options=VoteOptions())
    with pytest.raises(
        ValueError, match="optimizer 'adamw-global' takes options ByzantineOptions, got VoteOptions"
    ):
        entry("adamw-global").make(_one(), args)
    with pytest.raises(TypeError, match="as options= or as keywords, not both"):
        dlion.build_optimizer(
            "dlion-mavo", _one(), lr=0.1, weight_decay=0.0, options=VoteOptions(), cautious_wd=True
        )


def test_catalogue_builds_each_config_from_shared_arguments_and_its_options() -> None:
    """What the rows pass whole equals the configs built by hand from the same values."""
    from dlion.worker.baselines.global_opt import GlobalConfig
    from dlion.worker.core.byzantine import Byzantine
    from dlion.worker.lion.config import DistributedLionConfig

    common: dict[str, Any] = {"lr": 0.1, "weight_decay": 0.0, "seed": 5, "start": "verify"}
    attack = Byzantine(workers=0, attack="zero")  # one process: no rank may attack
    sto: Any = dlion.build_optimizer("dlion-sto", _one(), **common, backend="allgather", cautious_wd=True)
    assert sto.config == DistributedLionConfig(
        vote="average", binarize="stochastic", backend="allgather", cautious_wd=True, seed=5, start="verify"
    )
    dgc: Any = dlion.build_optimizer("dgc", _one(), **common, betas=(0.7, 0.9), backend="server")
    assert dgc.config == dlion.DGCConfig(momentum=0.7, backend="server", seed=5, start="verify")
    tern: Any = dlion.build_optimizer("terngrad", _one(), **common, betas=(0.6, 0.9))
    assert (
        tern.config == dlion.TernGradConfig(seed=5, start="verify") and tern.inner.defaults["momentum"] == 0.6
    )
    glob: Any = dlion.build_optimizer("lion-global", _one(), **common, byzantine=attack)
    assert glob.config == GlobalConfig(byzantine=attack, seed=5, start="verify")


def test_train_config_hands_each_row_its_own_settings() -> None:
    """--procs-per-node and --powersgd-rank reach the rows that have them; the others ignore them."""
    from dlion.train.config import TrainConfig
    from dlion.worker.core.build_args import ByzantineOptions

    psgd = TrainConfig(optimizer="powersgd", powersgd_rank=8, steps=100, procs_per_node=2).build_args()
    assert (psgd.options.rank, psgd.options.start_iter) == (8, 10)  # the fp32 warm-up: warmup_steps
    hier = TrainConfig(optimizer="dlion-mavo", backend="hierarchical", procs_per_node=2, powersgd_rank=8)
    assert hier.build_args().options.procs_per_node == 2
    assert TrainConfig(optimizer="adamw-global", procs_per_node=2).build_args().options == ByzantineOptions()


def test_global_optimizer_takes_its_config_whole_or_as_keywords() -> None:
    from dlion.worker.baselines.global_opt import GlobalConfig

    inner = torch.optim.SGD(_one(), lr=0.1)
    assert GlobalOptimizer(inner, config=GlobalConfig(wire_dtype="bfloat16")).wire_dtype == torch.bfloat16
    assert (
        GlobalOptimizer(torch.optim.SGD(_one(), lr=0.1), wire_dtype="bfloat16").config.wire_dtype
        == "bfloat16"
    )
    with pytest.raises(TypeError, match="either config= or its fields as keywords, not both"):
        GlobalOptimizer(torch.optim.SGD(_one(), lr=0.1), config=GlobalConfig(), seed=1)
    with pytest.raises(TypeError, match="unknown option"):
        GlobalOptimizer(torch.optim.SGD(_one(), lr=0.1), wire="float32")
    with pytest.raises(ValueError, match="wire_dtype must be one of float32, bfloat16; got 'int8'"):
        GlobalOptimizer(torch.optim.SGD(_one(), lr=0.1), wire_dtype="int8")


def test_distributed_lion_takes_its_config_whole_or_as_keywords() -> None:
    """The two forms build the same optimizer, which takes the same steps (world of one)."""
    torch.manual_seed(0)
    grads = [torch.randn(37) for _ in range(3)]
    finals = []
    for kwargs in (
        {"vote": "average", "seed": 3},
        {"config": dlion.DistributedLionConfig(vote="average", seed=3)},
    ):
        p = torch.nn.Parameter(torch.ones(37))
        opt = dlion.DistributedLion([p], lr=0.01, weight_decay=0.1, **kwargs)  # type: ignore[arg-type]
        assert opt.config == dlion.DistributedLionConfig(vote="average", seed=3)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        finals.append(p.detach().clone())
    assert torch.equal(finals[0], finals[1])
    with pytest.raises(TypeError, match="unknown option"):
        dlion.DistributedLion(_one(), votes="average")
    with pytest.raises(TypeError, match="not both"):
        dlion.DistributedLion(_one(), config=dlion.DistributedLionConfig(), vote="average")
    with pytest.raises(TypeError, match="config must be a DistributedLionConfig"):
        dlion.DistributedLion(_one(), config={"vote": "average"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dedicated_server=True needs server="):
        dlion.DistributedLion(
            _one(), config=dlion.DistributedLionConfig(backend="server", dedicated_server=True)
        )
    positional = dlion.DistributedLion(
        _one(), 0.01, (0.9, 0.99), 0.0, "average"
    )  # as before configs came whole
    assert positional.config.vote == "average"
    with pytest.raises(ValueError, match="binarize 'stochastic'"):
        dlion.DistributedLionConfig(backend="hierarchical", binarize="stochastic")
