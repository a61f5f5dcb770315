"""Single-process NumPy simulation of N dlion-local workers: the bit-exact reference.

Each worker runs H inner Lion steps (no weight decay) on its own gradients; at a round's end
each hands anchor - local (plus its error-feedback residual) to the vote of tests/sim.py as
one step of gradients, with the outer lr = outer_lr x the group's lr and the outer sign
momentum's betas, continued across rounds. It shares only the specification with the
optimizer: float32 operation order, the residual's float64 mean, the round's step keys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sim import Group, simulate

OUTER_BETA2 = 0.99


@dataclass(frozen=True)
class Rounds:
    local_steps: int
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    error_feedback: bool = False


def inner_lion(p: np.ndarray, g: np.ndarray, m: np.ndarray, lr: float, b1: float, b2: float) -> None:
    """One Lion step without weight decay, in place, in dlion.Lion's operation order."""
    c = m * np.float32(b1) + g * np.float32(1.0 - b1)
    p *= np.float32(1.0)
    p -= np.sign(c) * np.float32(lr)
    m *= np.float32(b2)
    m += g * np.float32(1.0 - b2)


def sign_residual(q: np.ndarray) -> np.ndarray:
    scale = np.float32(np.abs(q.astype(np.float64)).sum() / max(1, q.size))
    return q - np.sign(q) * scale


def simulate_local(
    params: list[np.ndarray],
    groups: list[Group],
    grads: list[list[list[np.ndarray | None]]],  # [step][rank][tensor]
    rounds: Rounds,
    *,
    vote: str,
    seed: int,
    bucket_numel: int,
) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """The anchor after the last step (a partial last round ends there, as ``sync()``), and
    each rank's local parameters just before that last round's end."""
    n, h = len(grads[0]), rounds.local_steps
    anchor = [p.astype(np.float32).copy() for p in params]
    local = [[p.copy() for p in anchor] for _ in range(n)]
    inner_m = [[np.zeros(p.shape, np.float32) for p in anchor] for _ in range(n)]
    outer_m = [[np.zeros(p.size, np.float32) for p in anchor] for _ in range(n)]
    residual: list[list[np.ndarray]] | None = None
    group_of = {i: g for g in groups for i in g.indices}
    outer_groups = [
        replace(g, lr=float(rounds.outer_lr * g.lr), betas=(rounds.outer_momentum, OUTER_BETA2))
        for g in groups
    ]
    touched = [[False] * len(anchor) for _ in range(n)]
    for step, step_grads in enumerate(grads):
        for r in range(n):
            for i, g in enumerate(step_grads[r]):
                if g is not None:
                    b1, b2 = group_of[i].betas
                    inner_lion(
                        local[r][i], g.reshape(local[r][i].shape), inner_m[r][i], group_of[i].lr, b1, b2
                    )
                    touched[r][i] = True
        if (step + 1) % h and step + 1 < len(grads):
            continue
        sent = [[anchor[i] - local[r][i] for i in range(len(anchor))] for r in range(n)]
        if residual is not None:
            sent = [
                [q + e for q, e in zip(qs, es, strict=True)] for qs, es in zip(sent, residual, strict=True)
            ]
        handed: list[list[np.ndarray | None]] = [
            [q if touched[r][i] else None for i, q in enumerate(sent[r])] for r in range(n)
        ]
        anchor, _ = simulate(
            anchor, outer_groups, [handed], vote=vote, tie="random", seed=seed, bucket_numel=bucket_numel,
            moms=outer_m, first_step=step // h,
        )  # fmt: skip
        if rounds.error_feedback:  # a tensor a rank sent nothing for keeps all of q
            residual = [
                [sign_residual(q) if touched[r][i] else q for i, q in enumerate(qs)]
                for r, qs in enumerate(sent)
            ]
        last_local = local
        local = [[p.copy() for p in anchor] for _ in range(n)]
        touched = [[False] * len(anchor) for _ in range(n)]
    return anchor, last_local
