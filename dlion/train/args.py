"""The job's flags, made from the config sections: one argument group per section, a flag
per field, its help the field's docstring. Nothing here lists a field by hand."""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import textwrap
from collections.abc import Sequence
from dataclasses import MISSING, Field, fields
from typing import Any

from dlion.train.config import SECTIONS, TrainConfig

_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source ("" without one)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen application): flags without help
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    for node, after in zip(body, [*body[1:], None], strict=True):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_flag(group: Any, f: Field[Any], doc: str) -> None:
    default = f.default if f.default is not MISSING else None
    kinds = {t.strip() for t in str(f.type).split("|")} - {"None"}
    (kind,) = kinds
    help_text = doc + (" (default: %(default)s)" if default is not None else "")
    options: dict[str, Any] = {"default": default, "help": help_text, **f.metadata}
    if kind == "bool":
        options.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
    else:
        options["type"] = _TYPES[kind]
    group.add_argument(f"--{f.name.replace('_', '-')}", **options)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's flags, a group per config section; shared by every launcher."""
    for section in SECTIONS:
        group = parser.add_argument_group(section.__name__.removesuffix("Section").lower(), section.__doc__)
        docs = field_docs(section)
        for f in fields(section):
            if f.name in section.__annotations__:  # each field once, in its own section
                _add_flag(group, f, docs.get(f.name, ""))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config of parsed flags; raises ValueError naming a bad value."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def parse_config(argv: Sequence[str] | None = None, *, prog: str = "python -m dlion.train") -> TrainConfig:
    parser = argparse.ArgumentParser(prog=prog, description="One worker of dlion's training job.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    raise AssertionError("unreachable: parser.error exits")
