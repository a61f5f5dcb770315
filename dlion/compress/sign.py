"""The 1-bit sign codec and how packets of signs combine (majority vote or average).

Combining N packets of packed signs yields *planes* plus a *table*: plane b holds bit b
of each element's code, and the update of an element is ``table[code]``. One apply
kernel then serves every rule:

| rule                         | planes          | table                     | result bits |
|------------------------------|-----------------|---------------------------|-------------|
| majority, odd N              | [win]           | [-1, +1]                  | 1           |
| majority, even N, tie=random | [win | tie&coin]| [-1, +1]                  | 1           |
| majority, even N, tie=zero   | [win, tie]      | [-1, +1, 0, 0]            | 2           |
| average                      | count planes    | (2k - N) / N for k <= N   | ceil(log2(N+1)) |
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dlion import kernels

MAJORITY_TABLE = np.array([-1.0, 1.0], dtype=np.float32)
TERNARY_TABLE = np.array([-1.0, 1.0, 0.0, 0.0], dtype=np.float32)


def average_table(n_workers: int) -> np.ndarray:
    """float32[2^B]: entry k = (2k - N)/N, the mean of k votes of +1 and N-k of -1."""
    n_planes = max(1, n_workers.bit_length())
    table = np.zeros(1 << n_planes, dtype=np.float32)
    k = np.arange(n_workers + 1)
    table[: n_workers + 1] = ((2 * k - n_workers) / n_workers).astype(np.float32)
    return table


def result_layout(*, vote: str, tie: str, n_workers: int) -> tuple[int, np.ndarray]:
    """(B, table) of a combined result, known to every rank before any byte arrives."""
    if vote == "average":
        return max(1, n_workers.bit_length()), average_table(n_workers)
    if n_workers % 2 == 0 and tie == "zero":
        return 2, TERNARY_TABLE
    return 1, MAJORITY_TABLE


@dataclass(frozen=True)
class Combined:
    """The aggregated update of one bucket: element update = table[code from planes]."""

    planes: np.ndarray  # uint8[B, nbytes]
    table: np.ndarray  # float32[2^B]


def combine_majority(packed: np.ndarray, *, tie: str, tie_key: int, start: int = 0) -> Combined:
    """packed: uint8[N, nbytes] of signs from N workers -> sign of their sum.

    tie="random" resolves an even split at bucket byte ``start + j`` with coin byte
    coin_bytes(tie_key, start + j), the same on every rank and for every backend;
    tie="zero" gives no update on an even split.
    """
    win, tied = kernels.majority_vote(packed)
    if packed.shape[0] % 2 == 1:
        return Combined(win[None, :], MAJORITY_TABLE)
    if tie == "zero":
        return Combined(np.stack([win, tied]), TERNARY_TABLE)
    if tied.any():
        win |= tied & kernels.coin_bytes(tie_key, start, tied.size)
    return Combined(win[None, :], MAJORITY_TABLE)


def combine_average(packed: np.ndarray) -> Combined:
    """packed: uint8[N, nbytes] -> mean of the N signs, as counts of +1 votes."""
    return Combined(kernels.count_planes(packed), average_table(packed.shape[0]))


def combine(packed: np.ndarray, *, vote: str, tie: str, tie_key: int, start: int = 0) -> Combined:
    """Combine packets covering bucket bytes [start, start + nbytes)."""
    if vote == "average":
        return combine_average(packed)
    return combine_majority(packed, tie=tie, tie_key=tie_key, start=start)
