"""Train a small base model from scratch: a byte-level BPE tokenizer and a GPT-2 causal LM or a Marian
encoder-decoder.

For users without a pretrained model (and for the demo, a CommonGen base model and small translation bases).
The data is a plain text file (one document or sentence per line) or parallel prompt/target line files
(CommonGen's ``train_src.txt``/``train_trg.txt``, or source/translation files). :func:`pretrain` writes a
directory that loads with ``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``
(``architecture="gpt2"``) or ``AutoModelForSeq2SeqLM.from_pretrained`` (``architecture="marian"``); see
``docs/pretrain.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._utils import make_temp_dir, set_plain_modes
from .data import right_pad

__all__ = [
    "EOS_TOKEN",
    "PretrainConfig",
    "PretrainResult",
    "build_tokenizer",
    "pretrain",
    "read_pairs",
    "read_text_lines",
]

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
"""The one special token: BOS = EOS = PAD = UNK, as in GPT-2."""

DATA_FORMATS = ("text", "pairs")
ARCHITECTURES = ("gpt2", "marian")
LR_SCHEDULES = ("cosine", "linear", "constant")
METRICS_FILE = "pretrain_metrics.jsonl"
CONFIG_FILE = "pretrain_config.json"
_BYTE_ALPHABET = 256


@dataclass
class PretrainConfig:
    """Everything :func:`pretrain` needs; saved as ``pretrain_config.json`` beside the model.

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

    data_format: str = "text"
    text_file: str | None = None
    source_file: str | None = None
    target_file: str | None = None
    validation_text_file: str | None = None
    validation_source_file: str | None = None
    validation_target_file: str | None = None
    validation_fraction: float = 0.05
    max_examples: int | None = None
    prompt_suffix: str = " ="
    prompt_loss: bool = False
    pack: bool = False
    # tokenizer
    vocab_size: int = 8000
    min_frequency: int = 2
    # model
    architecture: str = "gpt2"
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    context: int = 64
    dropout: float = 0.1
    # optimisation
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    lr_schedule: str = "cosine"
    grad_clip: float | None = 1.0
    max_steps: int | None = None
    max_epochs: float | None = 3.0
    # evaluation and early stopping
    eval_every: int = 200
    patience: int | None = 5
    min_delta: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "text_file",
            "source_file",
            "target_file",
            "validation_text_file",
            "validation_source_file",
            "validation_target_file",
        ):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a path or None, got {value!r}")
        self.validate(require_data=False)

    def validate(self, require_data: bool = True) -> None:
        """Raise ValueError naming the first bad field (``require_data``: also when data files are missing)."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"PretrainConfig: {message}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        need(
            self.data_format in DATA_FORMATS,
            f"data_format must be one of {DATA_FORMATS}, got {self.data_format!r}",
        )
        if self.data_format == "text":
            need(not require_data or self.text_file is not None, "data_format='text' needs text_file")
            stray = [
                n
                for n in ("source_file", "target_file", "validation_source_file", "validation_target_file")
                if getattr(self, n) is not None
            ]
            need(not stray, f"data_format='text' does not use {', '.join(stray)}")
        else:
            need(
                not require_data or (self.source_file is not None and self.target_file is not None),
                "data_format='pairs' needs source_file and target_file",
            )
            stray = [n for n in ("text_file", "validation_text_file") if getattr(self, n) is not None]
            need(not stray, f"data_format='pairs' does not use {', '.join(stray)}")
            need(
                (self.validation_source_file is None) == (self.validation_target_file is None),
                "give both validation_source_file and validation_target_file, or neither",
            )
            need(not self.pack, "pack=True is for data_format='text' only")
        need(
            self.architecture in ARCHITECTURES,
            f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}",
        )
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
            isinstance(self.validation_fraction, (int, float)) and 0.0 < self.validation_fraction < 1.0,
            f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}",
        )
        need(
            self.max_examples is None or (is_int(self.max_examples) and self.max_examples >= 1),
            f"max_examples must be a positive integer or None, got {self.max_examples!r}",
        )
        need(
            isinstance(self.prompt_suffix, str), f"prompt_suffix must be a string, got {self.prompt_suffix!r}"
        )
        min_vocab = _BYTE_ALPHABET + 1
        need(
            is_int(self.vocab_size) and self.vocab_size >= min_vocab,
            f"vocab_size must be an integer >= {min_vocab} (256 bytes + {EOS_TOKEN}), got {self.vocab_size!r}",
        )
        need(
            is_int(self.min_frequency) and self.min_frequency >= 1,
            f"min_frequency must be a positive integer, got {self.min_frequency!r}",
        )
        for name in ("n_layer", "n_embd", "n_head", "batch_size", "eval_every"):
            value = getattr(self, name)
            need(is_int(value) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        need(
            is_int(self.context) and self.context >= 2,
            f"context must be an integer >= 2, got {self.context!r}",
        )
        need(
            self.n_embd % self.n_head == 0,
            f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
        )
        need(
            isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
            f"dropout must be in [0, 1), got {self.dropout!r}",
        )
        need(
            isinstance(self.learning_rate, (int, float)) and self.learning_rate >= 0.0,
            f"learning_rate must be >= 0, got {self.learning_rate!r}",
        )
        need(
            isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0.0,
            f"weight_decay must be >= 0, got {self.weight_decay!r}",
        )
        need(
            isinstance(self.warmup_fraction, (int, float)) and 0.0 <= self.warmup_fraction < 1.0,
            f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}",
        )
        need(
            self.lr_schedule in LR_SCHEDULES,
            f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}",
        )
        need(
            self.grad_clip is None or (isinstance(self.grad_clip, (int, float)) and self.grad_clip > 0),
            f"grad_clip must be positive or None, got {self.grad_clip!r}",
        )
        need(
            self.max_steps is not None or self.max_epochs is not None,
            "give max_steps or max_epochs (or both: the smaller wins)",
        )
        need(
            self.max_steps is None or (is_int(self.max_steps) and self.max_steps >= 1),
            f"max_steps must be a positive integer or None, got {self.max_steps!r}",
        )
        need(
            self.max_epochs is None or (isinstance(self.max_epochs, (int, float)) and self.max_epochs > 0),
            f"max_epochs must be positive or None, got {self.max_epochs!r}",
        )
        need(
            self.patience is None or (is_int(self.patience) and self.patience >= 1),
            f"patience must be a positive integer or None, got {self.patience!r}",
        )
        need(
            isinstance(self.min_delta, (int, float)) and self.min_delta >= 0.0,
            f"min_delta must be >= 0, got {self.min_delta!r}",
        )
        need(is_int(self.seed), f"seed must be an integer, got {self.seed!r}")

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


@dataclass
class PretrainResult:
    """What :func:`pretrain` did. Losses are mean cross-entropies per predicted token, in nats."""

    output_dir: str
    train_loss: list[float] = field(default_factory=list)  # one per optimisation step
    val_loss: list[float] = field(default_factory=list)  # one per evaluation
    eval_steps: list[int] = field(default_factory=list)  # the step of each evaluation (0 = before training)
    best_val_loss: float = math.inf
    best_step: int = 0
    steps: int = 0
    stopped_early: bool = False
    stop_reason: str = ""  # why training ended: which limit was reached, or early stopping
    wall_seconds: float = 0.0
    num_parameters: int = 0  # trainable parameters (tied embeddings counted once)
    num_train_examples: int = 0
    num_val_examples: int = 0
    truncated_examples: int = 0  # training + validation examples cut at `context` tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Reading data


def _read_lines(path: str | os.PathLike, what: str) -> list[str]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {os.fspath(path)!r}")
    if not p.is_file():
        raise FileNotFoundError(f"{what} is not a file: {os.fspath(path)!r}")
    with open(p, encoding="utf-8") as f:
        return f.read().splitlines()


def read_text_lines(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped of surrounding whitespace."""
    lines = [line.strip() for line in _read_lines(path, "text file")]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"text file {os.fspath(path)!r} has no non-blank lines")
    return lines


def read_pairs(src_path: str | os.PathLike, tgt_path: str | os.PathLike) -> list[tuple[str, str]]:
    """(prompt, target) pairs from parallel line files; line i of one goes with line i of the other.

    Lines are stripped of surrounding whitespace. A blank target (or prompt) line is an error, since it would
    silently shift or drop an example.
    """
    sources = _read_lines(src_path, "source file")
    targets = _read_lines(tgt_path, "target file")
    if len(sources) != len(targets):
        raise ValueError(
            f"source and target files have different line counts: {os.fspath(src_path)!r} has "
            f"{len(sources)} lines, {os.fspath(tgt_path)!r} has {len(targets)}"
        )
    if not sources:
        raise ValueError(f"no examples: {os.fspath(src_path)!r} and {os.fspath(tgt_path)!r} are empty")
    pairs = []
    for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
        s, t = s.strip(), t.strip()
        for text, path in ((s, src_path), (t, tgt_path)):
            if not text:
                raise ValueError(
                    f"line {i + 1} of {os.fspath(path)!r} is blank: every line must hold an example"
                )
        pairs.append((s, t))
    return pairs


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(
    texts: Sequence[str],
    vocab_size: int,
    min_frequency: int = 2,
    model_max_length: int | None = None,
    append_eos: bool = False,
):
    """Train a byte-level BPE tokenizer on ``texts``; return it as a ``transformers`` fast tokenizer.

    ``<|endoftext|>`` is the only special token (id 0) and serves as BOS, EOS, PAD and UNK like GPT-2. By
    default no token is added when encoding, and decoding gives back the encoded text exactly. With
    ``append_eos=True`` (the encoder-decoder tokenizer, like Marian's) encoding appends EOS (unless
    ``add_special_tokens=False``); ``decode(..., skip_special_tokens=True)`` then gives back the text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if append_eos:
        eos_id = tokenizer.token_to_id(EOS_TOKEN)
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"$A {EOS_TOKEN}",
                    pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
                    special_tokens=[(EOS_TOKEN, eos_id)],
                ),
            ]
        )
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------------------
# Examples -> rows


@dataclass
class _Rows:
    """Right-padded rows: token ids, attention mask and labels (-100 where no loss is taken)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    truncated: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``index``, cut to the longest one in the batch."""
        mask = self.attention_mask[index]
        width = max(int(mask.sum(1).max()), 2)
        return self.input_ids[index, :width], mask[:, :width], self.labels[index, :width]


def _pad_rows(rows: list[tuple[list[int], list[bool]]], context: int, pad_id: int, truncated: int) -> _Rows:
    input_ids, mask = right_pad([row for row, _ in rows], pad_id, context)
    targets = [[t if keep else -100 for t, keep in zip(row, learn, strict=True)] for row, learn in rows]
    labels, _ = right_pad(targets, -100, context)
    return _Rows(input_ids, mask, labels, truncated)


def _text_rows(lines: Sequence[str], tokenizer, context: int, pack: bool) -> _Rows:
    eos = tokenizer.eos_token_id
    encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(list(lines), add_special_tokens=False)]
    rows: list[tuple[list[int], list[bool]]] = []
    truncated = 0
    if pack:
        stream = [eos]
        for ids in encoded:
            stream.extend(ids)
            stream.append(eos)
        # rows overlap by one token, so every token after the first is a target exactly once
        for start in range(0, len(stream) - 1, context - 1):
            chunk = stream[start : start + context]
            if len(chunk) >= 2:
                rows.append((chunk, [True] * len(chunk)))
    else:
        for ids in encoded:
            row = [eos, *ids, eos]
            if len(row) > context:
                row = row[:context]
                truncated += 1
            rows.append((row, [True] * len(row)))
    return _pad_rows(rows, context, eos, truncated)


def _prompt_text(prompt: str, suffix: str) -> str:
    return prompt if not suffix or prompt.endswith(suffix) else prompt + suffix


def _pair_rows(
    pairs: Sequence[tuple[str, str]], tokenizer, context: int, suffix: str, prompt_loss: bool
) -> _Rows:
    """One example per row: ``prompt ids + (" " + target) ids + EOS``, the prompt encoded on its own exactly
    as it will be at decoding time."""
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    prompts = [
        e.ids
        for e in backend.encode_batch([_prompt_text(p, suffix) for p, _ in pairs], add_special_tokens=False)
    ]
    targets = [e.ids for e in backend.encode_batch([" " + t for _, t in pairs], add_special_tokens=False)]
    rows: list[tuple[list[int], list[bool]]] = []
    truncated = 0
    for p, t in zip(prompts, targets, strict=True):
        row = [*p, *t, eos]
        learn = [prompt_loss] * len(p) + [True] * (len(t) + 1)
        if len(row) > context:
            row, learn = row[:context], learn[:context]
            truncated += 1
        if not any(learn[1:]):  # the prompt fills the context: nothing to learn from this row
            continue
        rows.append((row, learn))
    return _pad_rows(rows, context, eos, truncated)


@dataclass
class _Seq2SeqRows:
    """Encoder-decoder rows, right-padded: encoder ids (source + EOS), decoder inputs (start + target) and
    labels (target + EOS, -100 on padding); the decoder inputs are the labels shifted right by one."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    decoder_input_ids: torch.Tensor
    decoder_attention_mask: torch.Tensor
    labels: torch.Tensor
    truncated: int = 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``index``, each side cut to its longest row in the batch."""
        mask, dec_mask = self.attention_mask[index], self.decoder_attention_mask[index]
        width, dec_width = int(mask.sum(1).max()), int(dec_mask.sum(1).max())
        return {
            "input_ids": self.input_ids[index, :width],
            "attention_mask": mask[:, :width],
            "decoder_input_ids": self.decoder_input_ids[index, :dec_width],
            "decoder_attention_mask": dec_mask[:, :dec_width],
            "labels": self.labels[index, :dec_width],
        }


def _seq2seq_rows(pairs: Sequence[tuple[str, str]], tokenizer, context: int) -> _Seq2SeqRows:
    """One example per row: the encoder reads ``source ids + EOS``, the decoder reads ``EOS + target ids``
    (EOS is the decoder start token) and predicts ``target ids + EOS``.

    Source and target are each encoded on their own, without a leading space: ``source ids + EOS`` is what
    the marian tokenizer's ``tokenizer(source)`` gives, and ``target ids + EOS`` what
    ``tokenizer(text_target=target)`` gives as labels. At most ``context`` tokens per side: a longer source
    keeps its first ``context - 1`` tokens and its EOS, a longer target is cut (losing its EOS)."""
    eos = tokenizer.eos_token_id
    backend = tokenizer.backend_tokenizer
    sources = [e.ids for e in backend.encode_batch([s for s, _ in pairs], add_special_tokens=False)]
    targets = [e.ids for e in backend.encode_batch([t for _, t in pairs], add_special_tokens=False)]
    encoder, decoder, labels = [], [], []
    truncated = 0
    for src, tgt in zip(sources, targets, strict=True):
        cut = len(src) + 1 > context or len(tgt) + 1 > context
        truncated += cut
        encoder.append([*src[: context - 1], eos])
        label = [*tgt, eos][:context]
        labels.append(label)
        decoder.append([eos, *label[:-1]])
    input_ids, attention_mask = right_pad(encoder, eos, context)
    decoder_input_ids, decoder_attention_mask = right_pad(decoder, eos, context)
    label_ids, _ = right_pad(labels, -100, context)
    return _Seq2SeqRows(
        input_ids, attention_mask, decoder_input_ids, decoder_attention_mask, label_ids, truncated
    )


def _split(
    items: list, keys: list[str] | None, fraction: float, generator: torch.Generator
) -> tuple[list, list]:
    """Hold out about ``fraction`` of ``items`` (whole groups of equal ``keys`` when given)."""
    groups: dict[str, list[int]] = {}
    for i in range(len(items)):
        groups.setdefault(keys[i] if keys is not None else str(i), []).append(i)
    order = list(groups.values())
    if len(order) < 2:
        what = "distinct prompts" if keys is not None else "examples"
        raise ValueError(
            f"cannot hold out a validation split: only {len(order)} {what}; give more data or a validation file"
        )
    perm = torch.randperm(len(order), generator=generator).tolist()
    n_val = min(max(1, round(fraction * len(order))), len(order) - 1)
    val_groups = set(perm[:n_val])
    train = [items[i] for g, idx in enumerate(order) if g not in val_groups for i in idx]
    val = [items[i] for g, idx in enumerate(order) if g in val_groups for i in idx]
    return train, val


def _load_examples(config: PretrainConfig, generator: torch.Generator) -> tuple[list, list]:
    if config.data_format == "text":
        train = read_text_lines(config.text_file)
        val = read_text_lines(config.validation_text_file) if config.validation_text_file else None
    else:
        train = read_pairs(config.source_file, config.target_file)
        val = None
        if config.validation_source_file:
            val = read_pairs(config.validation_source_file, config.validation_target_file)
    if config.max_examples is not None:
        train = train[: config.max_examples]
    if val is None:
        keys = [p for p, _ in train] if config.data_format == "pairs" else None
        train, val = _split(train, keys, config.validation_fraction, generator)
    return train, val


# ---------------------------------------------------------------------------------------------------------
# Output directory


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() or output_dir.is_symlink():
        if not output_dir.is_dir():
            raise FileExistsError(f"output_dir {os.fspath(output_dir)!r} exists and is not a directory")
        if any(output_dir.iterdir()) and not overwrite:
            raise FileExistsError(
                f"output_dir {os.fspath(output_dir)!r} exists and is not empty; "
                "choose another directory or pass overwrite=True to replace it"
            )


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of ``path``; return the ones created (deepest first)."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for p in reversed(created):
        p.mkdir()
    return created


def _discard_partial(tmp: Path, created_parents: list[Path]) -> None:
    """After a failure: remove the half-built directory and the parents made for it (while still empty)."""
    shutil.rmtree(tmp, ignore_errors=True)
    for p in created_parents:  # deepest first
        try:
            p.rmdir()
        except OSError:
            break


def _move_into_place(tmp: Path, output_dir: Path, overwrite: bool) -> None:
    _check_output_dir(output_dir, overwrite)
    old = None
    if output_dir.exists():
        if any(output_dir.iterdir()):
            old = make_temp_dir(output_dir, "old")
            os.replace(output_dir, old / "dir")
        else:
            output_dir.rmdir()
    os.replace(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Training


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the learning rate for optimisation step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _batch_loss(model, input_ids, attention_mask, labels, reduction: str = "mean") -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


def _seq2seq_batch_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch["decoder_attention_mask"],
        use_cache=False,
    ).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        batch["labels"].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


def _rows_loss(
    model, rows: _Rows | _Seq2SeqRows, index, device: torch.device, reduction: str = "mean"
) -> tuple[torch.Tensor, int]:
    """The loss on ``rows[index]`` and the number of target tokens it is taken over."""
    if isinstance(rows, _Seq2SeqRows):
        batch = {k: v.to(device) for k, v in rows.batch(index).items()}
        return _seq2seq_batch_loss(model, batch, reduction), int((batch["labels"] != -100).sum())
    ids, mask, labels = (t.to(device) for t in rows.batch(index))
    return _batch_loss(model, ids, mask, labels, reduction), int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def _evaluate(model, rows: _Rows | _Seq2SeqRows, batch_size: int, device: torch.device) -> float:
    """Mean cross-entropy per target token over ``rows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        index = range(start, min(start + batch_size, len(rows)))
        loss, n = _rows_loss(model, rows, index, device, reduction="sum")
        total += loss.item()
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _special_ids_in_generation_config(model, eos: int) -> None:
    """The one special token is BOS, EOS and pad for generate() too."""
    model.generation_config.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def _build_marian(config: PretrainConfig, tokenizer):
    from transformers import MarianConfig, MarianMTModel

    eos = tokenizer.eos_token_id
    marian_config = MarianConfig(
        vocab_size=len(tokenizer),
        d_model=config.n_embd,
        encoder_layers=config.n_layer,
        decoder_layers=config.n_layer,
        encoder_attention_heads=config.n_head,
        decoder_attention_heads=config.n_head,
        encoder_ffn_dim=4 * config.n_embd,
        decoder_ffn_dim=4 * config.n_embd,
        max_position_embeddings=config.context,
        dropout=config.dropout,
        attention_dropout=config.dropout,
        activation_dropout=0.0,
        scale_embedding=True,  # as in the OPUS-MT Marian models: token embeddings on the sinusoids' scale
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        decoder_start_token_id=eos,
        forced_eos_token_id=None,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    model = MarianMTModel(marian_config)
    # Marian's embeddings treat pad_token_id as a padding index: a row initialised to zero that gets no
    # gradient from its uses as an input (only through the tied output layer). Here that id is also EOS and
    # the decoder start token (the tokenizer's one special token), which ends every source and starts every
    # decoder input, so it gets an ordinary trainable row. padding_idx only affects initialisation and
    # gradients, so the saved weights compute the same after from_pretrained.
    embeddings = model.model.shared  # tied: the same weight as the encoder's, decoder's and output layer's
    for module in (embeddings, model.get_encoder().embed_tokens, model.get_decoder().embed_tokens):
        module.padding_idx = None
    with torch.no_grad():
        embeddings.weight[eos].normal_(0.0, marian_config.init_std)
    _special_ids_in_generation_config(model, eos)
    model.generation_config.decoder_start_token_id = eos
    return model


def _build_model(config: PretrainConfig, tokenizer):
    if config.architecture == "marian":
        return _build_marian(config, tokenizer)
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    gpt2_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.context,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(gpt2_config)
    _special_ids_in_generation_config(model, eos)
    return model


def _stop_reason(config: PretrainConfig, result: PretrainResult, steps_per_epoch: int) -> str:
    """Why training ended after ``result.steps`` steps, in words (early stopping, max_steps or max_epochs)."""
    if result.stopped_early:
        n = config.patience
        return (
            f"early stopping: no held-out improvement for {n} evaluation{'s' if n != 1 else ''} "
            f"(best at step {result.best_step})"
        )
    epoch_steps = math.inf if config.max_epochs is None else math.ceil(config.max_epochs * steps_per_epoch)
    if config.max_steps is not None and config.max_steps <= epoch_steps:
        return f"max_steps={config.max_steps} reached"
    reason = f"max_epochs={config.max_epochs:g} reached at step {result.steps}"
    if config.max_steps is not None:
        reason += (
            f", before max_steps={config.max_steps} "
            "(raise --max-epochs or set it to none to train for --max-steps)"
        )
    return reason


def pretrain(
    config: PretrainConfig,
    output_dir: str | os.PathLike,
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> PretrainResult:
    """Train a tokenizer and a GPT-2 or Marian model as ``config`` says; save the best weights to
    ``output_dir``.

    ``output_dir`` ends up holding ``config.json``, ``generation_config.json``, ``model.safetensors``,
    ``tokenizer.json``, ``tokenizer_config.json``, ``pretrain_config.json`` and ``pretrain_metrics.jsonl``
    (one JSON line per evaluation). Everything is built in a hidden sibling directory and renamed into place
    at the end, so a failed or interrupted run leaves no partial model behind. An existing non-empty
    ``output_dir`` is refused unless ``overwrite=True``.
    """
    if not isinstance(config, PretrainConfig):
        raise TypeError(f"config must be a PretrainConfig, got {type(config).__name__}")
    config.validate()
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)  # fail before any work
    device = torch.device(device)
    start_time = time.perf_counter()

    generator = torch.Generator().manual_seed(config.seed)
    train_examples, val_examples = _load_examples(config, generator)

    if config.architecture == "marian":
        tokenizer_texts = [p for p, _ in train_examples] + [t for _, t in train_examples]
    elif config.data_format == "pairs":
        tokenizer_texts = [_prompt_text(p, config.prompt_suffix) + " " + t for p, t in train_examples]
    else:
        tokenizer_texts = list(train_examples)
    tokenizer = build_tokenizer(
        tokenizer_texts,
        config.vocab_size,
        config.min_frequency,
        config.context,
        append_eos=config.architecture == "marian",  # tokenizer(source) = what the encoder was trained on
    )
    if config.architecture == "marian":
        train_rows = _seq2seq_rows(train_examples, tokenizer, config.context)
        val_rows = _seq2seq_rows(val_examples, tokenizer, config.context)
    elif config.data_format == "pairs":
        train_rows = _pair_rows(
            train_examples, tokenizer, config.context, config.prompt_suffix, config.prompt_loss
        )
        val_rows = _pair_rows(
            val_examples, tokenizer, config.context, config.prompt_suffix, config.prompt_loss
        )
    else:
        train_rows = _text_rows(train_examples, tokenizer, config.context, config.pack)
        val_rows = _text_rows(val_examples, tokenizer, config.context, config.pack)
    for name, rows in (("training", train_rows), ("validation", val_rows)):
        if len(rows) == 0:
            raise ValueError(
                f"no {name} rows left after tokenization: every example's prompt fills the context ({config.context} tokens)"
            )

    torch.manual_seed(config.seed)
    model = _build_model(config, tokenizer).to(device)
    model.train()
    result = PretrainResult(
        output_dir=os.fspath(output_dir),
        num_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        num_train_examples=len(train_examples),
        num_val_examples=len(val_examples),
        truncated_examples=train_rows.truncated + val_rows.truncated,
    )

    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total = min(
        config.max_steps if config.max_steps is not None else math.inf,
        math.ceil(config.max_epochs * steps_per_epoch) if config.max_epochs is not None else math.inf,
    )
    total = max(1, int(total))
    warmup = int(config.warmup_fraction * total)
    trainable = [p for p in model.parameters() if p.requires_grad]  # Marian's sinusoidal positions are fixed
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )

    created_parents = _make_parents(output_dir)
    tmp = make_temp_dir(output_dir)  # renamed onto output_dir at the end: a plain mkdir()'s mode
    try:
        metrics = open(tmp / METRICS_FILE, "w", encoding="utf-8")
        best_state: dict[str, torch.Tensor] | None = None
        bad_evals = 0

        def evaluate(step: int) -> bool:
            """Evaluate, log, keep the best weights; True when patience has run out."""
            nonlocal best_state, bad_evals
            val = _evaluate(model, val_rows, config.batch_size, device)
            improved = val < result.best_val_loss - config.min_delta
            if improved:
                result.best_val_loss, result.best_step = val, step
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                bad_evals = 0
            else:
                bad_evals += 1
            result.val_loss.append(val)
            result.eval_steps.append(step)
            recent = result.train_loss[-config.eval_every :] if step else []
            record = {
                "step": step,
                "epoch": step / steps_per_epoch,
                "train_loss": sum(recent) / len(recent) if recent else None,
                "val_loss": val,
                "best_val_loss": result.best_val_loss,
                "best_step": result.best_step,
                "learning_rate": optimizer.param_groups[0]["lr"] if step else None,
                "elapsed_seconds": time.perf_counter() - start_time,
            }
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            bar.set_postfix(
                loss=f"{result.train_loss[-1]:.3f}" if step else "-",
                val=f"{val:.3f}",
                best=f"{result.best_val_loss:.3f}",
            )
            return config.patience is not None and bad_evals >= config.patience

        bar = tqdm(total=total, desc="pretrain", disable=not progress)
        try:
            stop = evaluate(0)
            step = 0
            while step < total and not stop:
                perm = torch.randperm(len(train_rows), generator=generator)
                for start in range(0, len(train_rows), config.batch_size):
                    if step >= total or stop:
                        break
                    for group in optimizer.param_groups:
                        group["lr"] = config.learning_rate * _lr_factor(
                            step, total, warmup, config.lr_schedule
                        )
                    loss, _ = _rows_loss(model, train_rows, perm[start : start + config.batch_size], device)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                    optimizer.step()
                    step += 1
                    result.train_loss.append(loss.item())
                    bar.update(1)
                    if step % config.eval_every == 0 or step == total:
                        stop = evaluate(step)
                    elif step % 10 == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}", best=f"{result.best_val_loss:.3f}")
        finally:
            bar.close()
            metrics.close()
        result.steps = step
        result.stopped_early = stop and step < total
        result.stop_reason = _stop_reason(config, result, steps_per_epoch)
        logger.info("pretrain stopped: %s", result.stop_reason)
        if progress:
            tqdm.write(f"pretrain stopped: {result.stop_reason}", file=sys.stderr)

        if best_state is None:
            raise FloatingPointError(
                f"the validation loss was never finite ({result.val_loss}); nothing to save"
            )
        model.load_state_dict(best_state)
        model.eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
            json.dump(config.to_dict(), f, indent=2)
            f.write("\n")
        result.wall_seconds = time.perf_counter() - start_time
        set_plain_modes(tmp)  # save_pretrained's safetensors file is 0o600
        _move_into_place(tmp, output_dir, overwrite)
    except BaseException:
        _discard_partial(tmp, created_parents)
        raise
    return result
