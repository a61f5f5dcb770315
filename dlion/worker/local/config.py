"""The local-steps optimizer's typed, validated settings and its rows' own options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dlion.checks import check_bool, check_int, check_number, one_of
from dlion.compress.quant import check_bits
from dlion.worker.core.build_args import VoteOptions

OuterLrUnit = Literal["inner_lr", "absolute"]
OUTER_LR_UNITS: tuple[str, ...] = ("inner_lr", "absolute")
Inner = Literal["lion", "adamw"]
INNERS: tuple[str, ...] = ("lion", "adamw")


@dataclass(frozen=True, kw_only=True)
class LocalStepsConfig:
    """How often the ranks meet, and how the outer step reads its learning rate.

    local_steps:    H, the inner steps per round; the outer step runs at every H-th step.
    outer_lr:       the outer learning rate every param group starts with (its key
                    ``outer_lr``, so a scheduler may move it).
    outer_lr_unit:  "inner_lr": the outer step's lr is ``outer_lr`` times the group's current
                    inner lr (a sign step has no size of its own, so it follows the inner
                    schedule); "absolute": ``outer_lr`` itself (DiLoCo's SGD, whose
                    pseudo-gradient already shrinks with the inner lr).
    error_feedback: each rank adds to its next pseudo-gradient what its sign did not carry:
                    e <- q - mean|q| sign(q), per tensor, q the pseudo-gradient plus e.
    """

    local_steps: int = 16
    outer_lr: float = 1.0
    outer_lr_unit: OuterLrUnit = "inner_lr"
    error_feedback: bool = False

    def __post_init__(self) -> None:
        check_int("local_steps", self.local_steps, low=1)
        check_number("outer_lr", self.outer_lr, low=0, low_open=True)
        one_of("outer_lr_unit", self.outer_lr_unit, OUTER_LR_UNITS)
        check_bool("error_feedback", self.error_feedback)


@dataclass(frozen=True, kw_only=True)
class LocalVoteOptions(VoteOptions):
    """dlion-local's own: the round's length, the outer step and the inner optimizer.

    outer_lr:       the outer sign step as a multiple of the inner lr (None: ``local_steps``/2,
                    from the study's grid, docs/local-steps.md).
    outer_momentum: beta1 of the outer sign momentum (arXiv 2411.17866), each rank's own, on
                    its pseudo-gradients; 0: none, the sign of the pseudo-gradient itself.
    inner:          the optimizer of the inner steps: "lion" (its own momentum) or "adamw".
    """

    local_steps: int = 16
    outer_lr: float | None = None
    outer_momentum: float = 0.0
    error_feedback: bool = False
    inner: Inner = "lion"

    def __post_init__(self) -> None:
        check_int("local_steps", self.local_steps, low=1)
        check_number("outer_lr", self.outer_lr, low=0, low_open=True, or_none=True)
        check_number("outer_momentum", self.outer_momentum, low=0, high=1, high_open=True)
        check_bool("error_feedback", self.error_feedback)
        one_of("inner", self.inner, INNERS)
        super().__post_init__()

    @property
    def resolved_outer_lr(self) -> float:
        return self.local_steps / 2 if self.outer_lr is None else self.outer_lr


@dataclass(frozen=True, kw_only=True)
class DiLoCoOptions:
    """DiLoCo's (arXiv 2311.08105): inner AdamW, outer Nesterov SGD on the all-reduced mean
    pseudo-gradient every ``local_steps`` steps: in fp32, or with ``outer_bits`` 8 or 4 its
    blockwise-quantized reduce-scatter and all-gather (torchft's ``should_quantize``)."""

    local_steps: int = 16
    outer_lr: float | None = None  # None: 0.7, the paper's
    outer_momentum: float | None = None  # None: 0.9, the paper's
    outer_bits: int | None = None  # None: the fp32 ring all-reduce

    def __post_init__(self) -> None:
        check_int("local_steps", self.local_steps, low=1)
        check_number("outer_lr", self.outer_lr, low=0, low_open=True, or_none=True)
        check_number("outer_momentum", self.outer_momentum, low=0, high=1, high_open=True, or_none=True)
        check_bits("outer_bits", self.outer_bits)
