"""Regular expressions: :class:`RegexOracle` and its flags, by int, name or letter."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from .base import OracleBase
from .registry import check_keys, register_oracle

_REGEX_FLAGS = {
    "ASCII": re.ASCII,
    "IGNORECASE": re.IGNORECASE,
    "MULTILINE": re.MULTILINE,
    "DOTALL": re.DOTALL,
    "VERBOSE": re.VERBOSE,
}
_FLAG_LETTERS = {"A": "ASCII", "I": "IGNORECASE", "M": "MULTILINE", "S": "DOTALL", "X": "VERBOSE"}


def _parse_flags(flags: Any) -> int:
    if isinstance(flags, bool):
        raise TypeError(f"regex flags must be names or an int, got {flags!r}")
    if isinstance(flags, int):
        unknown = int(flags) & ~functools.reduce(int.__or__, map(int, _REGEX_FLAGS.values()))
        if unknown:
            raise ValueError(f"unsupported regex flag bits {unknown}; supported: {', '.join(_REGEX_FLAGS)}")
        return int(flags)
    names = flags.split("|") if isinstance(flags, str) else list(flags)
    value = 0
    for raw in names:
        name = str(raw).strip().upper()
        name = _FLAG_LETTERS.get(name, name)
        if name not in _REGEX_FLAGS:
            raise ValueError(
                f"unknown regex flag {raw!r}; valid: {', '.join(_REGEX_FLAGS)} (or their letters A I M S X)"
            )
        value |= _REGEX_FLAGS[name]
    return value


def _flag_names(flags: int) -> list[str]:
    return [name for name, flag in _REGEX_FLAGS.items() if flags & flag]


class RegexOracle(OracleBase):
    """1.0 when the completion matches ``pattern`` (``mode="search"``: anywhere; ``"fullmatch"``: all of it).

    ``flags``: an int (``re.IGNORECASE | re.DOTALL``), a name, ``"IGNORECASE|DOTALL"`` or a list of names.
    ``strip=True`` strips surrounding whitespace from the completion first (decoded completions often begin
    with a space).
    """

    MODES = ("search", "fullmatch")

    def __init__(self, pattern: str, flags: Any = 0, mode: str = "search", *, strip: bool = False) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a string, got {pattern!r}")
        self.flags = _parse_flags(flags)
        try:
            self.regex = re.compile(pattern, self.flags)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        self.pattern = pattern
        self.mode = mode
        self.strip = bool(strip)

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        match = self.regex.search if self.mode == "search" else self.regex.fullmatch
        return [float(match(c.strip() if self.strip else c) is not None) for c in completions]

    def __repr__(self) -> str:
        flags = "|".join(_flag_names(self.flags)) or "0"
        strip = ", strip=True" if self.strip else ""
        return f"RegexOracle({self.pattern!r}, flags={flags}, mode={self.mode!r}{strip})"

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "regex",
            "pattern": self.pattern,
            "flags": _flag_names(self.flags),
            "mode": self.mode,
            "strip": self.strip,
        }


def _build_regex(c: Mapping, where: str) -> RegexOracle:
    check_keys(c, {"pattern"}, {"flags", "mode", "strip"}, where)
    return RegexOracle(
        c["pattern"], flags=c.get("flags", 0), mode=c.get("mode", "search"), strip=c.get("strip", False)
    )


register_oracle("regex", _build_regex)
