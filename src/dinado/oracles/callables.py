"""User functions as oracles: :class:`CallableOracle`, given a function or ``"package.module:function"``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .base import OracleBase
from .registry import check_keys, import_path, load_callable, register_oracle


class CallableOracle(OracleBase):
    """Any batched function ``fn(prompts, completions) -> values``, given itself or as ``"pkg.mod:fn"``.

    ``on="text"`` (default) when it reads decoded strings, ``on="tokens"`` when it reads token-id lists.
    """

    text_inputs = ()  # the function reads what it reads

    def __init__(self, fn: Callable | str, on: str = "text") -> None:
        if on not in ("text", "tokens"):
            raise ValueError(f"on must be 'text' or 'tokens', got {on!r}")
        if isinstance(fn, str):
            self.path: str | None = fn
            self.fn = load_callable(fn)
        elif callable(fn):
            self.fn = fn
            self.path = import_path(fn)
        else:
            raise TypeError(f"expected a callable or an import path 'package.module:function', got {fn!r}")
        self.on = on
        self.level = on

    def _score(self, prompts: list, completions: list) -> list[float]:
        return list(self.fn(prompts, completions))

    def __repr__(self) -> str:
        name = repr(self.path) if self.path else getattr(self.fn, "__qualname__", repr(self.fn))
        return f"CallableOracle({name}, on={self.on!r})"

    def to_config(self) -> dict[str, Any]:
        if self.path is None:
            raise ValueError(
                f"{self!r} cannot be written as a config: its function is not importable by name; "
                "define it at module level and give it as 'package.module:function'"
            )
        return {"type": "callable", "path": self.path, "on": self.on}


def _build_callable(c: Mapping, where: str) -> CallableOracle:
    check_keys(c, {"path"}, {"on"}, where)
    return CallableOracle(c["path"], on=c.get("on", "text"))


register_oracle("callable", _build_callable)
