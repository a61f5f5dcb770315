"""What one rank puts in its bits: the sign of its Lion direction or a stochastic sign, then,
for an attacking rank, the corruption. Fixed per plan; the routes carry it, whatever their path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dlion.compress.buckets import Slot
from dlion.compress.sign_ops import SignOps, stochastic_sign_step
from dlion.wire import ZERO_STREAM, derive_key, extend_key
from dlion.worker.core.byzantine import corrupt_bucket

# (grad, momentum, out bits, beta1, beta2, coin key): one tensor's fused sign step
SignStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float, float, int], None]


@dataclass(frozen=True)
class SignEncoder:
    """``stochastic`` (dlion-sto): a random sign, positive with probability (1 + clip(c /
    mean|c|, -1, 1)) / 2, in place of sign(c). ``attack``: this rank's Byzantine attack (None:
    honest), applied to its bits after the sign step, never to its momentum."""

    seed: int
    rank: int
    stochastic: bool = False
    attack: str | None = None

    def binarize(self, ops: SignOps) -> SignStep:
        """The fused sign step a per-tensor runner calls for each tensor."""
        return stochastic_sign_step if self.stochastic else ops.sign_step

    def keys(self, step: int, slots: Sequence[Slot]) -> list[int]:
        """Each tensor's key for the coins of its exact zeros (and dlion-sto's draws)."""
        prefix = derive_key(self.seed, ZERO_STREAM, step, self.rank)
        return [extend_key(prefix, s.index) for s in slots]

    def corrupt(self, send: torch.Tensor, slots: Sequence[Slot], live: Sequence[bool], step: int) -> None:
        if self.attack is not None:
            corrupt_bucket(send, slots, live, self.attack, seed=self.seed, step=step, rank=self.rank)
