"""Oracles: callables that judge whole sequences, on token ids or on decoded text, in batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

TokenOracle = Callable[[list[list[int]], list[list[int]]], Sequence[float]]


class Oracle(Protocol):
    """``oracle(prompts, completions) -> values in [0, 1]``, one per sample, batched."""

    def __call__(self, prompts: list[Any], completions: list[Any]) -> Sequence[float]: ...


class TextOracle:
    """Adapts an oracle on text to token ids by decoding with a tokenizer (special tokens dropped)."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]], tokenizer: Any) -> None:
        self.fn = fn
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[list[int]], completions: list[list[int]]) -> Sequence[float]:
        decode = lambda rows: self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        return self.fn(decode(prompts), decode(completions))

    def __repr__(self) -> str:
        return f"TextOracle({getattr(self.fn, '__name__', repr(self.fn))})"


def describe(oracle: Callable) -> str:
    return getattr(oracle, "__qualname__", None) or repr(oracle)


def call_oracle(oracle: Callable, prompts: list, completions: list) -> list[float]:
    """Call ``oracle`` on a batch and check its answer: one finite value in [0, 1] per sample."""
    try:
        values = list(oracle(prompts, completions))
    except Exception as exc:
        raise RuntimeError(
            f"the oracle {describe(oracle)} raised on a batch of {len(prompts)} samples: {exc}"
        ) from exc
    if len(values) != len(completions):
        raise ValueError(
            f"the oracle {describe(oracle)} returned {len(values)} values for {len(completions)} samples"
        )
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(
                f"the oracle returned {v!r} for sample {i}: expected a number in [0, 1]"
            ) from None
        if not math.isfinite(f) or f < 0 or f > 1:
            raise ValueError(f"the oracle returned {f!r} for sample {i}: values must be finite and in [0, 1]")
        out.append(f)
    return out
