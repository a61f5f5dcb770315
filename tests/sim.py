"""Single-process NumPy simulation of N Distributed Lion workers: the bit-exact reference.

It shares only the specification with the optimizer: bucket layout, coin keys, the
zero-sign and tie rules, and float32 operation order. The vote here unpacks to counts,
unlike the optimizer's bit-sliced kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dlion.compress.buckets import plan_buckets
from dlion.kernels import coin_bytes_ref, lion_sign_step_ref
from dlion.kernels.stochastic import stochastic_sign_step_ref
from dlion.wire import TIE_STREAM, ZERO_STREAM, derive_key
from dlion.worker.core.byzantine import attack_key


@dataclass
class Group:
    indices: list[int]
    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.99)


def simulate(
    params: list[np.ndarray],
    groups: list[Group],
    grads: list[list[list[np.ndarray | None]]],  # [step][rank][tensor]
    *,
    vote: str,
    tie: str,
    seed: int,
    bucket_numel: int,
    cautious: bool = False,
    attack: str | None = None,
    attackers: int = 0,
    binarize: str = "sign",
    moms: list[list[np.ndarray]] | None = None,
    first_step: int = 0,
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """Returns the final parameters and each rank's momenta; the last ``attackers`` ranks
    send ``attack``'s signs instead of their own (their momenta stay honest). ``moms`` (kept
    and updated in place) and ``first_step`` continue an earlier run."""
    n = len(grads[0])
    params = [p.astype(np.float32).copy() for p in params]
    if moms is None:
        moms = [[np.zeros(p.size, np.float32) for p in params] for _ in range(n)]
    group_of = {i: g for g in groups for i in g.indices}
    buckets = plan_buckets([p.size for p in params], bucket_numel)
    for step, step_grads in enumerate(grads, start=first_step):
        present = [any(step_grads[r][i] is not None for r in range(n)) for i in range(len(params))]
        for k, bucket in enumerate(buckets):
            bits = np.zeros((n, 8 * bucket.nbytes), np.int64)
            for s in bucket.slots:
                if not present[s.index]:
                    continue
                g = group_of[s.index]
                for r in range(n):
                    grad = step_grads[r][s.index]
                    grad = np.zeros(s.numel, np.float32) if grad is None else grad.reshape(-1)
                    out = np.zeros(s.nbytes, np.uint8)
                    key = derive_key(seed, ZERO_STREAM, step, r, s.index)
                    step_ref = stochastic_sign_step_ref if binarize == "stochastic" else lion_sign_step_ref
                    step_ref(grad, moms[r][s.index], out, g.betas[0], g.betas[1], key)
                    lo = 8 * s.byte_offset
                    bits[r, lo : lo + s.numel] = np.unpackbits(out, count=s.numel)
                    if r >= n - attackers:
                        key = attack_key(seed, step, r, s.index)
                        bits[r, lo : lo + s.numel] = _attacked(attack, bits[r, lo : lo + s.numel], key)
            counts = bits.sum(axis=0)
            if vote == "average":
                update = ((2 * counts - n) / n).astype(np.float32)
            else:
                update = np.sign(2 * counts - n).astype(np.float32)
                if tie == "random":
                    coin = np.unpackbits(
                        coin_bytes_ref(derive_key(seed, TIE_STREAM, step, k), 0, bucket.nbytes)
                    )
                    update = np.where(update == 0, coin.astype(np.float32) * 2 - 1, update)
            for s in bucket.slots:
                if not present[s.index]:
                    continue
                g = group_of[s.index]
                lo = 8 * s.byte_offset
                u = update[lo : lo + s.numel].reshape(params[s.index].shape)
                decay = np.full(u.shape, 1.0 - g.lr * g.weight_decay, np.float32)
                if cautious:  # cautious weight decay: none where update and parameter disagree
                    decay[u * params[s.index] < 0] = 1.0
                params[s.index] = params[s.index] * decay - np.float32(g.lr) * u
    return params, moms


def _attacked(attack: str | None, signs: np.ndarray, key: int) -> np.ndarray:
    """An attacker's sign bits (1 = positive) in place of its honest ``signs``."""
    if attack == "flip":
        return 1 - signs
    if attack == "random":
        return np.unpackbits(coin_bytes_ref(key, 0, -(-signs.size // 8)), count=signs.size).astype(np.int64)
    if attack == "zero":
        return np.zeros_like(signs)
    raise ValueError(f"unknown attack {attack!r}")


def start_bits(world: int, tensors: int) -> int:
    """One-off bits every rank sends, and receives, for the start of ranks that already hold
    equal parameters, the optimizer built after the process group: when built, the fingerprint
    (6 int64) and one CRC per tensor (int64, rows padded to whole 16-byte words); at the first
    step the CRCs again. All are all_gathers; nothing is broadcast."""
    return (world - 1) * 64 * (6 + 2 * max(2, -(-tensors // 2) * 2))
