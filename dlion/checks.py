"""Argument checks: each raises a ValueError naming the bad value and what was expected.

Every config and constructor of the library checks its arguments here, so a refusal reads
the same wherever it comes from: ``{name} must be {expected}, got {value!r}``. A bool is
refused where an int or a number is expected: Python counts True as 1, dlion never counts it
as a count, a rate or a seed.
"""

from __future__ import annotations

import math
from collections.abc import Collection


def check_int(
    name: str,
    value: object,
    *,
    low: int | None = None,
    high: int | None = None,
    or_none: bool = False,
    expected: str | None = None,
) -> None:
    """An int in [low, high] (either end open-ended when None); None too with ``or_none``.
    ``expected`` replaces the generated description (e.g. "an int >= 1") in the message."""
    if value is None and or_none:
        return
    ok = not isinstance(value, bool) and isinstance(value, int) and _within(value, low, high, False, False)
    if not ok:
        _refuse(name, value, expected or _join("an int", _range(low, high, False, False)), or_none)


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
    or_none: bool = False,
    expected: str | None = None,
) -> None:
    """An int or float (finite unless ``finite=False``) within the bounds: closed unless
    ``low_open``/``high_open``, open-ended where None; None too with ``or_none``."""
    if value is None and or_none:
        return
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and (math.isfinite(value) or not finite)
        and _within(value, low, high, low_open, high_open)
    )
    if not ok:
        kind = "a finite number" if finite else "a number"
        _refuse(name, value, expected or _join(kind, _range(low, high, low_open, high_open)), or_none)


def check_bool(name: str, value: object, *, or_none: bool = False) -> None:
    """True or False (not 0 or 1, which a typo in a config turns into silently)."""
    if not (isinstance(value, bool) or (value is None and or_none)):
        _refuse(name, value, "a bool", or_none)


def check_instance(name: str, value: object, kind: type, *, or_none: bool = False) -> None:
    """An instance of ``kind`` (a settings object such as Byzantine); None too with ``or_none``."""
    if not (isinstance(value, kind) or (value is None and or_none)):
        _refuse(name, value, f"a {kind.__name__}", or_none)


def one_of(name: str, value: object, allowed: Collection[str]) -> None:
    """One of the named choices; the message lists them all."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _within(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_show(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_show(high)}"
    return ""


def _show(bound: float) -> str:
    # An int bound prints whole (1024, not 1.0e+03); a float one as short as it reads (0.5, 1).
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _join(kind: str, bounds: str) -> str:
    return f"{kind} {bounds}" if bounds else kind


def _refuse(name: str, value: object, expected: str, or_none: bool) -> None:
    raise ValueError(f"{name} must be {expected}{' or None' if or_none else ''}, got {value!r}")
