"""Byzantine workers, for measuring what majority vote survives: K ranks send bad updates.

The last K ranks of the group attack; the rest are honest. Each attacker computes its step
as usual (its own momentum stays what an honest rank's would be) and corrupts only what it
sends:

| attack   | sign voters (bits on the wire)   | gradient all-reduce (fp32 on the wire) |
|----------|----------------------------------|----------------------------------------|
| "flip"   | every sign inverted              | the gradient negated                   |
| "random" | fair coin bits, fresh every step | Gaussian noise with the gradient's RMS |
| "zero"   | every sign -1 (all bits 0)       | zeros                                  |

The attacks are deterministic in (seed, step, rank, tensor), so runs with attackers
reproduce bit for bit like honest ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dlion.checks import check_int, one_of
from dlion.compress.buckets import Slot
from dlion.kernels import coin_bytes
from dlion.wire import BYZANTINE_STREAM, derive_key

ATTACKS: tuple[str, ...] = ("flip", "random", "zero")


@dataclass(frozen=True, kw_only=True)
class Byzantine:
    """``workers`` attackers (the last ranks) sending ``attack`` updates; the same on every rank."""

    workers: int
    attack: str = "flip"

    def __post_init__(self) -> None:
        check_int("byzantine workers", self.workers, low=0)
        one_of("attack", self.attack, ATTACKS)

    def attacks(self, rank: int, world_size: int) -> bool:
        """Whether ``rank`` is an attacker; at least one rank must stay honest."""
        if self.workers >= world_size:
            raise ValueError(
                f"{self.workers} byzantine workers out of {world_size} leaves no honest rank; "
                f"expected at most {world_size - 1}"
            )
        return rank >= world_size - self.workers


def attack_of(byzantine: Byzantine | None, rank: int, world_size: int) -> str | None:
    """The attack ``rank`` sends, or None for an honest rank."""
    return byzantine.attack if byzantine is not None and byzantine.attacks(rank, world_size) else None


def corrupt_signs(bits: torch.Tensor, numel: int, attack: str, key: int) -> None:
    """In place on one tensor's packed signs (uint8, MSB first, ``numel`` payload bits);
    the padding bits after the payload stay 0, as an honest rank sends them."""
    nbytes = -(-numel // 8)
    if bits.dtype != torch.uint8 or bits.numel() < nbytes:
        got = f"{bits.dtype}[{bits.numel()}]"
        raise ValueError(f"expected at least {nbytes} uint8 bytes for {numel} signs, got {got}")
    one_of("attack", attack, ATTACKS)
    payload = bits[:nbytes]
    if attack == "flip":
        payload.bitwise_not_()
    elif attack == "random":
        payload.copy_(torch.from_numpy(coin_bytes(key, 0, nbytes)))
    else:  # "zero"
        payload.zero_()
    if numel % 8:
        payload[-1:].bitwise_and_(0xFF << (8 - numel % 8) & 0xFF)


def corrupt_bucket(
    send: torch.Tensor,
    slots: Sequence[Slot],
    live: Sequence[bool],
    attack: str,
    *,
    seed: int,
    step: int,
    rank: int,
) -> None:
    """``corrupt_signs`` on every live tensor of a bucket's send buffer."""
    for s, on in zip(slots, live, strict=True):
        if on:
            bits = send[s.byte_offset : s.byte_offset + s.nbytes]
            corrupt_signs(bits, s.numel, attack, attack_key(seed, step, rank, s.index))


def corrupt_grad(grad: torch.Tensor, attack: str, key: int) -> None:
    """In place on a gradient about to be all-reduced."""
    one_of("attack", attack, ATTACKS)
    if attack == "flip":
        grad.neg_()
    elif attack == "random":
        rms = grad.float().pow(2).mean().sqrt() if grad.numel() else torch.zeros(())
        gen = torch.Generator().manual_seed(key & ((1 << 63) - 1))
        noise = torch.randn(grad.shape, generator=gen, dtype=torch.float32)
        grad.copy_(noise.to(grad.device) * rms.to(grad.device))
    else:  # "zero"
        grad.zero_()


def attack_key(seed: int, step: int, rank: int, index: int) -> int:
    """The coin key of one rank's tensor at one step (fair-coin bits, noise seeds)."""
    return derive_key(seed, BYZANTINE_STREAM, step, rank, index)
