"""Train a small base model from scratch: a byte-level BPE tokenizer and a GPT-2-architecture causal LM.

For users without a pretrained model (and for the demo and a CommonGen base model). The data is a plain text
file (one document or sentence per line) or parallel prompt/target line files (CommonGen's
``train_src.txt``/``train_trg.txt``). :func:`pretrain` writes a directory that loads with
``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``; see ``docs/pretrain.md``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = [
    "EOS_TOKEN",
    "PretrainConfig",
    "PretrainResult",
    "build_tokenizer",
    "pretrain",
    "read_pairs",
    "read_text_lines",
]

EOS_TOKEN = "<|endoftext|>"
"""The one special token: BOS = EOS = PAD = UNK, as in GPT-2."""

DATA_FORMATS = ("text", "pairs")
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
      EOS only, which is what a conditional base model needs).
    - ``pack``: text only; concatenate ``EOS line EOS line ...`` and cut it into rows of ``context`` tokens
      instead of one right-padded line per row (faster on long documents, lines may be split across rows).

    Tokenizer: byte-level BPE with ``vocab_size`` entries in all (256 bytes + ``<|endoftext|>`` + merges) and
    merges seen at least ``min_frequency`` times, trained on the training split only.

    Model: GPT-2 with ``n_layer`` blocks of width ``n_embd`` and ``n_head`` heads, ``context`` positions,
    ``dropout`` on embeddings, attention and residuals. Input and output embeddings are tied.

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
    wall_seconds: float = 0.0
    num_parameters: int = 0
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
    texts: Sequence[str], vocab_size: int, min_frequency: int = 2, model_max_length: int | None = None
):
    """Train a byte-level BPE tokenizer on ``texts``; return it as a ``transformers`` fast tokenizer.

    ``<|endoftext|>`` is the only special token (id 0) and serves as BOS, EOS, PAD and UNK like GPT-2. No
    token is added when encoding, and decoding gives back the encoded text exactly.
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
    lengths = torch.tensor([len(row) for row, _ in rows], dtype=torch.long)
    mask = torch.arange(context).unsqueeze(0) < lengths.unsqueeze(1)  # row-major order = the flat order
    flat_ids = torch.tensor([t for row, _ in rows for t in row], dtype=torch.long)
    flat_learn = torch.tensor([keep for _, learn in rows for keep in learn], dtype=torch.bool)
    input_ids = torch.full((len(rows), context), pad_id, dtype=torch.long)
    input_ids[mask] = flat_ids
    labels = torch.full((len(rows), context), -100, dtype=torch.long)
    labels[mask] = torch.where(flat_learn, flat_ids, torch.tensor(-100))
    return _Rows(input_ids, mask.long(), labels, truncated)


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


def _move_into_place(tmp: Path, output_dir: Path, overwrite: bool) -> None:
    _check_output_dir(output_dir, overwrite)
    old = None
    if output_dir.exists():
        if any(output_dir.iterdir()):
            old = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.old-"))
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


@torch.no_grad()
def _evaluate(model, rows: _Rows, batch_size: int, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids, mask, labels = (
            t.to(device) for t in rows.batch(range(start, min(start + batch_size, len(rows))))
        )
        total += _batch_loss(model, ids, mask, labels, reduction="sum").item()
        count += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def _build_model(config: PretrainConfig, tokenizer):
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
    model.generation_config.bos_token_id = eos
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    return model


def pretrain(
    config: PretrainConfig,
    output_dir: str | os.PathLike,
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> PretrainResult:
    """Train a tokenizer and a GPT-2 model as ``config`` says; save the best weights to ``output_dir``.

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

    if config.data_format == "pairs":
        tokenizer_texts = [_prompt_text(p, config.prompt_suffix) + " " + t for p, t in train_examples]
    else:
        tokenizer_texts = list(train_examples)
    tokenizer = build_tokenizer(tokenizer_texts, config.vocab_size, config.min_frequency, config.context)
    if config.data_format == "pairs":
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
        num_parameters=sum(p.numel() for p in model.parameters()),
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
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.learning_rate,
    )

    created_parents = _make_parents(output_dir)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}.tmp-"))
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
                    ids, mask, labels = (
                        t.to(device) for t in train_rows.batch(perm[start : start + config.batch_size])
                    )
                    loss = _batch_loss(model, ids, mask, labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
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
        _move_into_place(tmp, output_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in created_parents:  # deepest first; only while still empty
            try:
                p.rmdir()
            except OSError:
                break
        raise
    return result
