"""dlion.checks: every refusal names the value and what was expected, in one wording."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest

from dlion.checks import check_bool, check_instance, check_int, check_number, one_of


def _refused(message: str) -> Any:
    return pytest.raises(ValueError, match=f"^{re.escape(message)}$")


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, {"low": 1}, "steps must be an int >= 1, got 0"),
        (True, {"low": 0}, "steps must be an int >= 0, got True"),  # a bool is no count
        (2.0, {}, "steps must be an int, got 2.0"),
        ("3", {"low": 1}, "steps must be an int >= 1, got '3'"),
        (9, {"high": 8}, "steps must be an int <= 8, got 9"),
        (0, {"low": 1, "high": 8}, "steps must be an int in [1, 8], got 0"),
        (0, {"low": 1, "or_none": True}, "steps must be an int >= 1 or None, got 0"),
        (None, {"low": 1}, "steps must be an int >= 1, got None"),
        (0, {"low": 1, "expected": ">= 1"}, "steps must be >= 1, got 0"),
        (1023, {"low": 1024}, "steps must be an int >= 1024, got 1023"),
    ],
)
def test_check_int_names_the_value_and_the_range(
    value: object, kwargs: dict[str, object], message: str
) -> None:
    with _refused(message):
        check_int("steps", value, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [(1, {"low": 1}), (8, {"low": 1, "high": 8}), (None, {"or_none": True}), (-5, {}), (2**70, {"low": 0})],
)
def test_check_int_accepts_what_is_in_range(value: object, kwargs: dict[str, object]) -> None:
    check_int("n", value, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (float("nan"), {"low": 0}, "lr must be a finite number >= 0, got nan"),
        (float("inf"), {}, "lr must be a finite number, got inf"),
        (-1.0, {"low": 0}, "lr must be a finite number >= 0, got -1.0"),
        (0, {"low": 0, "low_open": True}, "lr must be a finite number > 0, got 0"),
        (1.0, {"low": 0, "high": 1, "high_open": True}, "lr must be a finite number in [0, 1), got 1.0"),
        (0.0, {"low": 0, "high": 1, "low_open": True}, "lr must be a finite number in (0, 1], got 0.0"),
        (0.0, {"low": 0.5, "high": 0.75}, "lr must be a finite number in [0.5, 0.75], got 0.0"),
        (2, {"high": 1, "high_open": True}, "lr must be a finite number < 1, got 2"),
        (False, {}, "lr must be a finite number, got False"),
        ("0.1", {}, "lr must be a finite number, got '0.1'"),
        (0, {"low": 0, "low_open": True, "or_none": True}, "lr must be a finite number > 0 or None, got 0"),
        (0.5, {"low": 1, "finite": False}, "lr must be a number >= 1, got 0.5"),
        (float("nan"), {"low": 1, "finite": False}, "lr must be a number >= 1, got nan"),
        (float("inf"), {"expected": "finite"}, "lr must be finite, got inf"),
    ],
)
def test_check_number_names_the_value_and_the_range(
    value: object, kwargs: dict[str, object], message: str
) -> None:
    with _refused(message):
        check_number("lr", value, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (0, {"low": 0}),
        (1, {"low": 0, "high": 1}),
        (0.999, {"low": 0, "high": 1, "high_open": True}),
        (None, {"or_none": True}),
        (float("inf"), {"low": 1, "finite": False}),
        (float("nan"), {"finite": False}),  # unbounded: a NaN is still a number
    ],
)
def test_check_number_accepts_what_is_in_range(value: object, kwargs: dict[str, object]) -> None:
    check_number("x", value, **kwargs)  # type: ignore[arg-type]


def test_check_bool_refuses_what_only_looks_like_one() -> None:
    check_bool("overlap", True)
    check_bool("overlap", None, or_none=True)
    with _refused("overlap must be a bool, got 1"):
        check_bool("overlap", 1)
    with _refused("overlap must be a bool, got 'true'"):
        check_bool("overlap", "true")
    with _refused("overlap must be a bool or None, got 0"):
        check_bool("overlap", 0, or_none=True)


@dataclass(frozen=True)
class _Setting:
    k: int


def test_check_instance_names_the_class() -> None:
    check_instance("byzantine", _Setting(1), _Setting)
    check_instance("byzantine", None, _Setting, or_none=True)
    with _refused("byzantine must be a _Setting or None, got 2"):
        check_instance("byzantine", 2, _Setting, or_none=True)
    with _refused("byzantine must be a _Setting, got None"):
        check_instance("byzantine", None, _Setting)


def test_one_of_lists_every_choice() -> None:
    one_of("vote", "average", ("majority", "average"))
    one_of("backend", "server", {"allgather": 1, "server": 2})  # any collection of names
    with _refused("vote must be one of majority, average; got 'mean'"):
        one_of("vote", "mean", ("majority", "average"))
    with _refused("vote must be one of majority, average; got None"):
        one_of("vote", None, ("majority", "average"))
    with _refused("vote must be one of majority, average; got ['majority']"):
        one_of("vote", ["majority"], ("majority", "average"))
