"""Comma-separated lists in the job benchmarks' flags: parsed (argparse types), checked in their plans."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def check_names(name: str, values: Sequence[str], allowed: Sequence[str]) -> None:
    """A plan's list of choices: non-empty, each one of ``allowed``."""
    if not values or any(v not in allowed for v in values):
        raise ValueError(f"{name} must be a non-empty list of {', '.join(allowed)}; got {list(values)}")


def check_ints(name: str, values: Sequence[int], low: int) -> None:
    """A plan's list of integers: non-empty, each at least ``low``."""
    if not values or any(v < low for v in values):
        raise ValueError(f"{name} must be a non-empty list of ints >= {low}, got {list(values)}")
