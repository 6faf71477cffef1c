"""``PretrainConfig``: every field with its default, its one-line help (``metadata["help"]``, what ``dinado
pretrain --FIELD`` shows) and its own check (``metadata["check"]``, a :class:`Rule`); the checks that tie
fields together are :meth:`PretrainConfig.check_combinations`."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

EOS_TOKEN = "<|endoftext|>"
"""The one special token: BOS = EOS = PAD = UNK, as in GPT-2."""

BYTE_ALPHABET = 256
DATA_FORMATS = ("text", "pairs")
ARCHITECTURES = ("gpt2", "marian")
LR_SCHEDULES = ("cosine", "linear", "constant")


# ---------------------------------------------------------------------------------------------------------
# Per-field rules


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


@dataclass(frozen=True)
class Rule:
    """What one field's value must be: ``ok(value)``, and ``expect`` for the error message
    (``PretrainConfig: {name} must be {expect}, got {value!r}``)."""

    ok: Callable[[Any], bool]
    expect: str

    def check(self, name: str, value: Any) -> None:
        if not self.ok(value):
            raise ValueError(f"PretrainConfig: {name} must be {self.expect}, got {value!r}")


def one_of(options: tuple[str, ...]) -> Rule:
    return Rule(lambda v: v in options, f"one of {options}")


def int_at_least(low: int, note: str = "") -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}{note}")


def or_none(rule: Rule) -> Rule:
    return Rule(lambda v: v is None or rule.ok(v), f"{rule.expect} or None")


POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 1, "a positive integer")
INTEGER = Rule(_is_int, "an integer")
POSITIVE = Rule(lambda v: _is_number(v) and v > 0, "positive")
NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0.0, ">= 0")
OPEN_FRACTION = Rule(lambda v: _is_number(v) and 0.0 < v < 1.0, "in (0, 1)")
FRACTION = Rule(lambda v: _is_number(v) and 0.0 <= v < 1.0, "in [0, 1)")
STRING = Rule(lambda v: isinstance(v, str), "a string")


def option(default: Any, help: str, check: Rule | None = None, path: bool = False) -> Any:
    """A field with its CLI help line, its rule (None: any value) and whether it is a path (str or PathLike,
    stored as str)."""
    return field(default=default, metadata={"help": help, "check": check, "path": path})


# ---------------------------------------------------------------------------------------------------------
# The config


@dataclass
class PretrainConfig:
    """Everything :func:`dinado.pretrain.pretrain` needs; saved as ``pretrain_config.json`` beside the model.

    Data (``data_format="text"``: ``text_file``; ``"pairs"``: ``source_file`` and ``target_file``):

    - ``text_file``: UTF-8 text, one document/sentence per line; blank lines are skipped.
    - ``source_file``/``target_file``: parallel line files, prompt on line i of one, its target on line i of
      the other. Each example is ``prompt + prompt_suffix + " " + target`` followed by EOS (e.g.
      ``"dog frisbee catch = A dog catches a frisbee.<|endoftext|>"``); ``prompt_suffix`` is not added to
      a prompt that already ends with it.
    - ``validation_*``: an explicit held-out set in the same format. Without it, ``validation_fraction`` of
      the training examples are held out at random (for pairs, whole prompts: all targets of one prompt land
      on the same side, so the held-out loss measures prompts never seen in training).
    - ``max_examples``: use only the first N training examples (after reading; None = all).
    - ``prompt_loss``: pairs only; also train on the prompt tokens (default: the loss is on the target and
      EOS only, which is what a conditional base model needs). GPT-2 only.
    - ``pack``: text only; concatenate ``EOS line EOS line ...`` and cut it into rows of ``context`` tokens
      instead of one right-padded line per row (faster on long documents, lines may be split across rows).

    Tokenizer: byte-level BPE with ``vocab_size`` entries in all (256 bytes + ``<|endoftext|>`` + merges) and
    merges seen at least ``min_frequency`` times, trained on the training split only.

    Model (``architecture``):

    - ``"gpt2"``: a GPT-2 causal LM with ``n_layer`` blocks of width ``n_embd`` and ``n_head`` heads,
      ``context`` positions, ``dropout`` on embeddings, attention and residuals. Input and output embeddings
      are tied.
    - ``"marian"``: a Marian encoder-decoder (``MarianMTModel``) for ``data_format="pairs"``, e.g. a small
      translation base. ``n_layer`` encoder and ``n_layer`` decoder layers of width ``n_embd``, ``n_head``
      heads, feed-forward width ``4 * n_embd``, sinusoidal positions for ``context`` tokens per side,
      ``dropout`` on embeddings, attention and residuals; one embedding matrix shared by encoder, decoder and
      output layer. The encoder reads ``source ids + EOS``, the decoder starts from EOS (the
      ``decoder_start_token_id``) and learns ``target ids + EOS``; the saved tokenizer appends the EOS
      itself, as Marian's does (``tokenizer(source)`` ends in EOS). ``prompt_suffix`` and ``prompt_loss``
      are not used. A source longer than ``context - 1`` tokens keeps its first ``context - 1`` and the EOS; a
      target (with EOS) longer than ``context`` is cut (its EOS is then lost); both are counted in
      ``truncated_examples``.

    Optimisation: AdamW (``learning_rate``, ``weight_decay`` on matrices only, gradients clipped to
    ``grad_clip``), linear warm-up over ``warmup_fraction`` of the steps, then ``lr_schedule`` decay to zero
    at the last step (``"cosine"``, ``"linear"``, or ``"constant"``). Training stops after ``max_steps``
    steps or ``max_epochs`` passes over the training rows, whichever comes first (at least one must be set).

    Early stopping: the held-out loss (mean cross-entropy per target token) is measured before training,
    every ``eval_every`` steps and after the last step; an evaluation improves when it is below the best so
    far by more than ``min_delta``. Training stops after ``patience`` evaluations in a row without
    improvement (``patience=None``: never). The best weights are the ones saved.

    ``seed`` seeds the split, the model's initialisation, the batch order and dropout: the same config and
    data give the same weights (on the same machine and thread count).
    """

    # data
    data_format: str = option(
        "text",
        "'text' (one example per line of text_file) or 'pairs' (source_file + target_file)",
        one_of(DATA_FORMATS),
    )
    text_file: str | None = option(None, "UTF-8 text, one document or sentence per line", path=True)
    source_file: str | None = option(None, "pairs: the prompts, one per line", path=True)
    target_file: str | None = option(
        None, "pairs: the targets, line i going with line i of source_file", path=True
    )
    validation_text_file: str | None = option(
        None, "held-out text (default: a validation_fraction split)", path=True
    )
    validation_source_file: str | None = option(
        None, "held-out pairs: prompts (with validation_target_file)", path=True
    )
    validation_target_file: str | None = option(
        None, "held-out pairs: targets (with validation_source_file)", path=True
    )
    validation_fraction: float = option(
        0.05,
        "share of the training examples (pairs: of the prompts) held out when no validation file is given",
        OPEN_FRACTION,
    )
    max_examples: int | None = option(
        None, "use only the first N training examples (none: all)", or_none(POSITIVE_INT)
    )
    prompt_suffix: str = option(" =", "pairs: appended to a prompt that does not end with it", STRING)
    prompt_loss: bool = option(
        False, "pairs, gpt2: also train on the prompt tokens (default: target and EOS only)"
    )
    pack: bool = option(False, "text: concatenate the lines and cut them into context-token rows")
    # tokenizer
    vocab_size: int = option(
        8000,
        "BPE vocabulary size at most (256 bytes + <|endoftext|> + merges)",
        int_at_least(BYTE_ALPHABET + 1, f" (256 bytes + {EOS_TOKEN})"),
    )
    min_frequency: int = option(2, "BPE merges seen fewer times are not learned", POSITIVE_INT)
    # model
    architecture: str = option(
        "gpt2", "'gpt2' (causal LM) or 'marian' (encoder-decoder, for pairs)", one_of(ARCHITECTURES)
    )
    n_layer: int = option(4, "transformer blocks (marian: per encoder and per decoder)", POSITIVE_INT)
    n_embd: int = option(256, "model width (a multiple of n_head)", POSITIVE_INT)
    n_head: int = option(4, "attention heads", POSITIVE_INT)
    context: int = option(64, "positions: tokens per row (marian: per side)", int_at_least(2))
    dropout: float = option(0.1, "dropout on embeddings, attention and residuals", FRACTION)
    # optimisation
    batch_size: int = option(32, "rows per optimisation step", POSITIVE_INT)
    learning_rate: float = option(1e-3, "AdamW peak learning rate", NON_NEGATIVE)
    weight_decay: float = option(0.01, "AdamW weight decay, on matrices only", NON_NEGATIVE)
    warmup_fraction: float = option(0.05, "share of the steps with a linear learning-rate warm-up", FRACTION)
    lr_schedule: str = option(
        "cosine",
        "decay after the warm-up, to 0 at the last step: cosine, linear or constant",
        one_of(LR_SCHEDULES),
    )
    grad_clip: float | None = option(
        1.0, "clip the gradient norm to this (none: no clipping)", or_none(POSITIVE)
    )
    max_steps: int | None = option(
        None, "stop after this many steps (with max_epochs: the smaller wins)", or_none(POSITIVE_INT)
    )
    max_epochs: float | None = option(
        3.0, "stop after this many passes over the training rows (none: max_steps only)", or_none(POSITIVE)
    )
    # evaluation and early stopping
    eval_every: int = option(200, "steps between held-out evaluations", POSITIVE_INT)
    patience: int | None = option(
        5, "stop after this many evaluations without improvement (none: never)", or_none(POSITIVE_INT)
    )
    min_delta: float = option(
        0.0, "an evaluation improves when below the best by more than this", NON_NEGATIVE
    )
    seed: int = option(0, "seeds the split, the initialisation, the batch order and dropout", INTEGER)

    def __post_init__(self) -> None:
        for f in fields(self):
            if not f.metadata["path"]:
                continue
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                setattr(self, f.name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"{f.name} must be a path or None, got {value!r}")
        self.validate(require_data=False)

    def validate(self, require_data: bool = True) -> None:
        """Raise ValueError naming the first bad field (``require_data``: also when data files are missing):
        each field's own rule in field order, then :meth:`check_combinations`."""
        for f in fields(self):
            if f.metadata["check"] is not None:
                f.metadata["check"].check(f.name, getattr(self, f.name))
        self.check_combinations(require_data)

    def check_combinations(self, require_data: bool = True) -> None:
        """The checks that tie fields together (the fields' own rules have passed)."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"PretrainConfig: {message}")

        def given(*names: str) -> list[str]:
            return [n for n in names if getattr(self, n) is not None]

        if self.data_format == "text":
            need(not require_data or self.text_file is not None, "data_format='text' needs text_file")
            stray = given("source_file", "target_file", "validation_source_file", "validation_target_file")
            need(not stray, f"data_format='text' does not use {', '.join(stray)}")
        else:
            need(
                not require_data or (self.source_file is not None and self.target_file is not None),
                "data_format='pairs' needs source_file and target_file",
            )
            stray = given("text_file", "validation_text_file")
            need(not stray, f"data_format='pairs' does not use {', '.join(stray)}")
            need(
                (self.validation_source_file is None) == (self.validation_target_file is None),
                "give both validation_source_file and validation_target_file, or neither",
            )
            need(not self.pack, "pack=True is for data_format='text' only")
        if self.architecture == "marian":
            need(
                self.data_format == "pairs",
                "architecture='marian' (encoder-decoder) needs data_format='pairs' "
                f"(source_file/target_file), got data_format={self.data_format!r}",
            )
            need(
                not self.prompt_loss,
                "prompt_loss=True is for architecture='gpt2' only: a marian model reads the source with its "
                "encoder and learns only the target",
            )
        need(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
        )
        need(
            self.max_steps is not None or self.max_epochs is not None,
            "give max_steps or max_epochs (or both: the smaller wins)",
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        """The inverse of :meth:`to_dict`; unknown keys are an error (a typo would otherwise be ignored)."""
        if not isinstance(data, dict):
            raise TypeError(f"PretrainConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown PretrainConfig keys: {', '.join(map(repr, unknown))} (known keys: {', '.join(sorted(known))})"
            )
        return cls(**data)
