"""Values: one parser per kind of value, used for flags (argparse ``type=``) and config-file values alike, so that
``--max-steps 5.7`` and ``max_steps: 5.7`` get the same answer; and which kind a typed field or argument gets."""

from __future__ import annotations

import argparse
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import yaml


def _parse_int(text: Any) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _parse_float(text: Any) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.5 or 1e-3, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(parse: Callable[[Any], Any], ok: Callable[[Any], bool], rule: str) -> Callable[[Any], Any]:
    """``parse``, then a range check that says ``rule`` and the value it got."""

    def parse_bounded(text: Any) -> Any:
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {value:g}")
        return value

    return parse_bounded


_parse_count = _bounded(_parse_int, lambda v: v >= 1, "must be at least 1")
_parse_positive = _bounded(_parse_float, lambda v: v > 0, "must be greater than 0")
_parse_nonnegative = _bounded(_parse_float, lambda v: v >= 0, "must be 0 or more")
_parse_probability = _bounded(_parse_float, lambda v: 0 < v <= 1, "must be in (0, 1]")


def _parse_bool(text: Any) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_str(text: Any) -> str:
    return str(text)


def _parse_auto_bool(text: Any) -> str | bool:
    return "auto" if str(text).strip().lower() == "auto" else _parse_bool(text)


def _parse_mapping(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not valid YAML/JSON: {' '.join(str(exc).split())}") from None


REGEX_CHARACTERS = set("*[]()|\\^$+?{}")  # not ".": module paths hold dots and are names


def _parse_names(text: Any) -> str | list[str]:
    """``all-linear``, module names separated by commas (a YAML list of names is joined first), or one regular
    expression (any of ``*[]()|\\^$+?{}`` in it) that PEFT matches against each module's full name."""
    if isinstance(text, str) and REGEX_CHARACTERS & set(text):
        pattern = text.strip()  # the expression that is checked is the one that is kept
        try:
            re.compile(pattern)
        except re.error as exc:
            raise argparse.ArgumentTypeError(f"not a valid regular expression {text!r}: {exc}") from None
        return pattern
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(
            f"expected all-linear or module names separated by commas, got {text!r}"
        )
    return names[0] if names == ["all-linear"] else names


def _parse_rank(text: Any) -> int | str:
    """A head rank: auto or a whole number >= 1 (null, for full rank, is the nullable keys' own word)."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    return _parse_count(text)


# kind name -> (parser, what a value looks like in messages)
KINDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "int": (_parse_int, "a whole number"),
    "count": (_parse_count, "a whole number >= 1"),
    "rank": (_parse_rank, "auto, null (full rank) or a whole number >= 1"),
    "float": (_parse_float, "a number"),
    "positive": (_parse_positive, "a number > 0"),
    "nonnegative": (_parse_nonnegative, "a number >= 0"),
    "probability": (_parse_probability, "a number in (0, 1]"),
    "str": (_parse_str, "a string"),
    "names": (_parse_names, "all-linear, module names separated by commas, or one regular expression"),
    "bool": (_parse_bool, "true or false"),
    "auto_bool": (_parse_auto_bool, "auto, true or false"),
    "flag": (_parse_bool, "true or false"),
    "mapping": (_parse_mapping, "a mapping"),
}
LIST_KINDS = ("names",)  # kinds whose config-file value may be a YAML list of strings (joined by commas)
NONE_WORDS = ("none", "null")


class _NoneValue:
    """`--max-epochs none` for a key that may be null: overrides a non-null default with None."""

    def __repr__(self) -> str:
        return "none"


NONE = _NoneValue()


def or_none(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A flag for a key that may be null also takes `none`."""

    def parse_or_none(text: Any) -> Any:
        return NONE if str(text).strip().lower() in NONE_WORDS else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")
    return parse_or_none


# ---------------------------------------------------------------------- kinds of typed fields and arguments
# The kind a number, a flag or a string annotation gets; the range rule differs by where it comes from:
PLAIN = {"int": "int", "float": "float", "bool": "bool"}  # the type only (its own checks then apply)
SIZES = {"int": "count", "float": "nonnegative", "bool": "bool"}  # sizes >= 1; weights and rates >= 0
STEPS = {"int": "count", "float": "positive", "bool": "bool"}  # counts >= 1; rates, caps and epochs > 0


def _type_names(annotation: Any) -> list[str]:
    """``"int | None"`` (a string under ``from __future__ import annotations``) or ``int | None`` as names."""
    if isinstance(annotation, str):
        return [part.strip() for part in annotation.split("|")]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        members = typing.get_args(annotation)
    else:
        members = (annotation,)
    return ["None" if m is type(None) else str(m) if typing.get_args(m) else m.__name__ for m in members]


def kind_of(annotation: Any, numbers: Mapping[str, str]) -> tuple[str, bool]:
    """The kind of a value annotated ``annotation`` (its first type decides) and whether None is allowed."""
    parts = _type_names(annotation)
    if parts[0] in numbers:
        kind = numbers[parts[0]]
    elif parts[0] == "str" and any(part.startswith("list") for part in parts):
        kind = "names"
    else:
        kind = "str"
    return kind, "None" in parts
