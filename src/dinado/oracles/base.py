"""The oracle contract: ``oracle(prompts, completions) -> values in [0, 1]``, checked by :func:`call_oracle`.

:class:`OracleBase` is a template method: its ``__call__`` checks the inputs once (as many prompts as
completions; decoded text where the oracle reads text) and calls ``_score``, which a subclass implements and
which only computes. :class:`TextOracle` adapts a text oracle to token ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

TokenOracle = Callable[[list[list[int]], list[list[int]]], Sequence[float]]


class Oracle(Protocol):
    """``oracle(prompts, completions) -> values in [0, 1]``, one per sample, batched."""

    def __call__(self, prompts: list[Any], completions: list[Any]) -> Sequence[float]: ...


class TextOracle:
    """Adapts an oracle on text to token ids by decoding with a tokenizer (special tokens dropped)."""

    level = "tokens"

    def __init__(
        self,
        fn: Callable[[list[str], list[str]], Sequence[float]],
        tokenizer: Any,
        prompt_texts: Mapping[tuple[int, ...], str] | None = None,
    ) -> None:
        self.fn = fn
        self.tokenizer = tokenizer
        # the text a prompt's token ids stand for (e.g. a prompts-file line before a template or chat
        # template decorated it): the oracle judges that, not the decoded decoration
        self.prompt_texts = dict(prompt_texts or {})

    def __call__(self, prompts: list[list[int]], completions: list[list[int]]) -> Sequence[float]:
        decode = lambda rows: self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        texts = [self.prompt_texts.get(tuple(p)) for p in prompts]
        missing = [i for i, t in enumerate(texts) if t is None]
        if missing:
            for i, text in zip(missing, decode([prompts[i] for i in missing]), strict=True):
                texts[i] = text
        return self.fn(texts, decode(completions))

    def __repr__(self) -> str:
        return f"TextOracle({getattr(self.fn, '__name__', repr(self.fn))})"


def describe(oracle: Callable) -> str:
    return getattr(oracle, "__qualname__", None) or repr(oracle)


class OracleError(RuntimeError):
    """An oracle raised while judging samples; the message names the first sample that fails."""


def _first_failing_sample(oracle: Callable, prompts: list, completions: list) -> tuple[int, Exception] | None:
    for i in range(len(completions)):
        try:
            oracle(prompts[i : i + 1], completions[i : i + 1])
        except Exception as exc:
            return i, exc
    return None


def call_oracle(oracle: Callable, prompts: list, completions: list) -> list[float]:
    """Call ``oracle`` on a batch and check its answer: one finite value in [0, 1] per sample."""
    try:
        values = list(oracle(prompts, completions))
    except Exception:
        where = f"on a batch of {len(prompts)} samples"
        found = _first_failing_sample(oracle, prompts, completions)
        if found is not None:  # name the first sample that fails on its own
            i, exc = found
            where += f" (first failing: sample {i}, completion {str(completions[i])[:80]!r})"
        raise OracleError(
            f"the oracle {describe(oracle)} raised {where}: {exc} (fix the oracle: it must take a batch of "
            "prompts and completions and return one value in [0, 1] per sample)"
        ) from exc
    if len(values) != len(completions):
        raise ValueError(
            f"the oracle {describe(oracle)} returned {len(values)} values for {len(completions)} samples: "
            "it must return one value per sample"
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


def _check_batch(prompts: Sequence, completions: Sequence) -> None:
    if len(prompts) != len(completions):
        raise ValueError(
            f"prompts and completions must have the same length; got {len(prompts)} and {len(completions)}"
        )


def check_text(rows: Sequence, what: str) -> None:
    """Refuse anything but ``str`` in ``rows`` (``what`` names them in the error)."""
    for i, row in enumerate(rows):
        if not isinstance(row, str):
            raise TypeError(
                f"{what}[{i}] is a {type(row).__name__}, not a str: this oracle reads decoded text; "
                "wrap it in TextOracle(oracle, tokenizer) to use it on token ids"
            )


class OracleBase:
    """Base of the oracles of dinado: ``__call__`` checks the batch once and calls ``_score``.

    A subclass implements ``_score(prompts, completions) -> list[float]`` (inputs already checked),
    ``__repr__`` and ``to_config()``. ``level`` says what the oracle reads: ``"text"`` (decoded strings) or
    ``"tokens"`` (token-id lists). ``text_inputs`` names the inputs that must be decoded text: the
    completions, and the prompts for an oracle that reads them; ``()`` for oracles that take anything.
    """

    level: str | None = "text"
    text_inputs: tuple[str, ...] = ("completions",)

    def __call__(self, prompts: list, completions: list) -> list[float]:
        self._check_inputs(prompts, completions)
        return self._score(prompts, completions)

    def _check_inputs(self, prompts: Sequence, completions: Sequence) -> None:
        _check_batch(prompts, completions)
        for what, rows in (("completions", completions), ("prompts", prompts)):
            if what in self.text_inputs:
                check_text(rows, what)

    def _score(self, prompts: list, completions: list) -> list[float]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement _score(prompts, completions)")

    def to_config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def description(self) -> str:
        return repr(self)


def level_of(oracle: Callable) -> str | None:
    """``"text"`` or ``"tokens"`` as the oracle says (its ``level``), else None."""
    level = getattr(oracle, "level", None)
    return level if level in ("text", "tokens") else None


def as_token_oracle(
    oracle: Callable, tokenizer: Any, prompt_texts: Mapping[tuple[int, ...], str] | None = None
) -> Callable:
    """An oracle on token ids: text-level oracles are wrapped in :class:`TextOracle` (``prompt_texts``: the
    text each prompt's ids stand for), others returned as is."""
    return TextOracle(oracle, tokenizer, prompt_texts) if level_of(oracle) == "text" else oracle


def config_of(oracle: Callable) -> dict[str, Any]:
    """``oracle.to_config()``, or an error saying how to make a plain function writable as a config."""
    to_config = getattr(oracle, "to_config", None)
    if to_config is None:
        raise ValueError(
            f"{describe(oracle)} cannot be written as a config: wrap a function in "
            "CallableOracle('package.module:function')"
        )
    return to_config()
