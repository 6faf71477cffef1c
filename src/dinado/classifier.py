"""Train a small text classifier from scratch, for use as an oracle (:class:`dinado.oracles.ClassifierOracle`).

:func:`train_classifier` trains a byte-level BPE tokenizer on the training texts (or takes one) and a tiny
BERT-architecture encoder with a sequence-classification head, built from a config (no download). The
trained tokenizer puts ``<|endoftext|>`` in front of every text; the classification head reads that
position. The output directory loads back with ``AutoModelForSequenceClassification.from_pretrained`` and
``AutoTokenizer.from_pretrained`` (and so with ``ClassifierOracle.from_pretrained``). See docs/oracles.md.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ._utils import LRSchedule, adamw, atomic_directory, backward_step, check_output_dir
from .data import right_pad
from .hf import eval_mode
from .oracles import ClassifierOracle
from .pretrain import EOS_TOKEN, build_tokenizer

__all__ = ["CLASSIFIER_FILE", "ClassifierResult", "evaluate_classifier", "train_classifier"]

CLASSIFIER_FILE = "classifier.json"
"""Hyperparameters, label names and metrics, saved beside the model."""

_MIN_VOCAB = 258  # the 256 byte symbols, the special token, and at least one merge


@dataclass
class ClassifierResult:
    """What :func:`train_classifier` returns. ``model`` is in eval mode, on the training device."""

    model: Any
    tokenizer: Any
    label_names: tuple[str, ...]
    train_accuracy: float
    validation_accuracy: float | None
    num_train: int
    num_validation: int
    num_parameters: int
    truncated: int
    """Training and validation texts cut to ``max_length`` tokens."""
    wall_seconds: float
    hyperparameters: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per epoch: epoch, mean training loss, validation accuracy (None without validation)."""
    output_dir: str | None = None

    def metrics(self) -> dict[str, Any]:
        """The numbers saved in ``classifier.json`` under ``"metrics"``."""
        return {
            "train_accuracy": self.train_accuracy,
            "validation_accuracy": self.validation_accuracy,
            "num_train": self.num_train,
            "num_validation": self.num_validation,
            "num_parameters": self.num_parameters,
            "truncated": self.truncated,
            "wall_seconds": self.wall_seconds,
        }

    def oracle(self, label: str | int, **kwargs: Any) -> ClassifierOracle:
        """``ClassifierOracle(model, tokenizer, label, **kwargs)``; its config names ``output_dir`` if saved."""
        oracle = ClassifierOracle(self.model, self.tokenizer, label, **kwargs)
        if self.output_dir is not None:
            oracle.name_or_path = self.output_dir
        return oracle


# ---------------------------------------------------------------------------------------------------------
# input checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_label_names(label_names: Any) -> tuple[str, ...]:
    if isinstance(label_names, str) or not isinstance(label_names, Sequence):
        raise TypeError(f"label_names must be a sequence of class names, got {label_names!r}")
    names = tuple(label_names)
    if len(names) < 2:
        raise ValueError(f"label_names needs at least 2 classes, got {list(names)}")
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise TypeError(f"label_names[{i}] must be a non-empty str, got {name!r}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"label_names has duplicates: {duplicates}")
    return names


def _check_data(
    texts: Any, labels: Any, label_names: tuple[str, ...], what: str
) -> tuple[list[str], list[int]]:
    """``(texts, label indices)``; ``what`` names the data in errors ("training", "validation")."""
    for name, rows in (("texts", texts), ("labels", labels)):
        if isinstance(rows, str) or not isinstance(rows, Sequence):
            raise TypeError(f"{what} {name} must be a list, got {type(rows).__name__}")
    texts, labels = list(texts), list(labels)
    if not texts:
        raise ValueError(f"no {what} texts")
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} {what} texts but {len(labels)} labels")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what} texts[{i}] must be a str, got {type(text).__name__}")
    index = {name: i for i, name in enumerate(label_names)}
    ids = []
    for i, label in enumerate(labels):
        if not isinstance(label, str) or label not in index:
            raise ValueError(f"{what} labels[{i}] is {label!r}, not one of label_names {list(label_names)}")
        ids.append(index[label])
    return texts, ids


def _check_hyperparameters(h: dict[str, Any], with_tokenizer: bool) -> None:
    positive_ints = ["hidden_size", "num_layers", "num_heads", "epochs", "batch_size", "seed"]
    if not with_tokenizer:
        positive_ints += ["vocab_size", "min_frequency"]
    for key in positive_ints:
        low = 0 if key == "seed" else 1
        if not _is_int(h[key]) or h[key] < low:
            raise ValueError(f"{key} must be an int >= {low}, got {h[key]!r}")
    if not with_tokenizer and h["vocab_size"] < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be >= {_MIN_VOCAB} (256 byte symbols + {EOS_TOKEN} + merges), got {h['vocab_size']}"
        )
    if not _is_int(h["max_length"]) or h["max_length"] < 2:
        raise ValueError(f"max_length must be an int >= 2 (tokens per text), got {h['max_length']!r}")
    if h["hidden_size"] % h["num_heads"]:
        raise ValueError(
            f"hidden_size ({h['hidden_size']}) must be divisible by num_heads ({h['num_heads']})"
        )
    if not _is_number(h["learning_rate"]) or h["learning_rate"] <= 0:
        raise ValueError(f"learning_rate must be a finite number > 0, got {h['learning_rate']!r}")
    if not _is_number(h["weight_decay"]) or h["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {h['weight_decay']!r}")
    for key in ("dropout", "warmup_fraction"):
        if not _is_number(h[key]) or not 0 <= h[key] < 1:
            raise ValueError(f"{key} must be in [0, 1), got {h[key]!r}")


# ---------------------------------------------------------------------------------------------------------
# model and tokenizer


def _classifier_tokenizer(texts: list[str], vocab_size: int, min_frequency: int, max_length: int):
    """:func:`dinado.pretrain.build_tokenizer`, plus ``<|endoftext|>`` in front of every text (the CLS slot)."""
    from tokenizers import processors

    tokenizer = build_tokenizer(texts, vocab_size, min_frequency, model_max_length=max_length)
    bos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    tokenizer.backend_tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{EOS_TOKEN} $A", pair=f"{EOS_TOKEN} $A $B", special_tokens=[(EOS_TOKEN, bos)]
            ),
        ]
    )
    return tokenizer


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has no pad, EOS or BOS token to pad with; set tokenizer.pad_token")


def _build_model(tokenizer: Any, label_names: tuple[str, ...], h: dict[str, Any]):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=h["hidden_size"],
        num_hidden_layers=h["num_layers"],
        num_attention_heads=h["num_heads"],
        intermediate_size=4 * h["hidden_size"],
        max_position_embeddings=h["max_length"],
        type_vocab_size=1,
        hidden_dropout_prob=h["dropout"],
        attention_probs_dropout_prob=h["dropout"],
        classifier_dropout=h["dropout"],
        pad_token_id=_pad_id(tokenizer),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    return BertForSequenceClassification(config)


def _batch(rows: list[list[int]], index: list[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    return right_pad([rows[i] for i in index], pad)


def _accuracy(reader: ClassifierOracle, texts: list[str], ids: list[int]) -> float:
    predicted = reader.logits(texts).argmax(dim=-1).tolist()
    return sum(p == y for p, y in zip(predicted, ids, strict=True)) / len(ids)


# ---------------------------------------------------------------------------------------------------------
# training


def train_classifier(
    texts: Sequence[str],
    labels: Sequence[str],
    output_dir: str | os.PathLike | None = None,
    *,
    label_names: Sequence[str],
    tokenizer: Any = None,
    vocab_size: int = 2000,
    min_frequency: int = 2,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    max_length: int = 128,
    dropout: float = 0.1,
    epochs: int = 10,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_fraction: float = 0.1,
    validation: tuple[Sequence[str], Sequence[str]] | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    device: str | torch.device = "cpu",
) -> ClassifierResult:
    """Train a text classifier: ``labels[i]`` (a name from ``label_names``) is the class of ``texts[i]``.

    - Tokenizer: without ``tokenizer``, a byte-level BPE of ``vocab_size`` tokens (merges seen at least
      ``min_frequency`` times) is trained on ``texts`` only, with ``<|endoftext|>`` added in front of every
      text. A given tokenizer is used as it is (padding with its pad, else EOS, else BOS token).
    - Model: a BERT encoder (``num_layers`` layers of width ``hidden_size``, ``num_heads`` heads, feed-forward
      4x wider, ``dropout``) with a classification head on the first position; ``id2label`` holds
      ``label_names``. Texts are cut to ``max_length`` tokens.
    - Training: cross-entropy, AdamW (``learning_rate``, ``weight_decay`` on matrices), linear warm-up over
      ``warmup_fraction`` of the steps then linear decay to 0, gradients clipped to norm 1, ``epochs`` passes
      over the data in shuffled batches of ``batch_size``. The final weights are kept (no early stopping).
      ``validation=(texts, labels)`` is scored after every epoch (``history``) and at the end; it does not
      influence training. The same ``seed`` (on the same machine and device) gives the same weights.
    - ``output_dir``: when given, ``config.json``, ``model.safetensors``, the tokenizer files and
      ``classifier.json`` (hyperparameters, label names, metrics, history) are written to a hidden sibling
      directory and renamed into place at the end. An existing non-empty ``output_dir`` is refused before any
      work unless ``overwrite=True``.

    The defaults were chosen on 20% validation splits carved from CoCoA-MT en-de and en-es train (see
    docs/oracles.md); a model of this size trains in seconds to a minute on one CPU thread.
    """
    names = _check_label_names(label_names)
    train_texts, train_ids = _check_data(texts, labels, names, "training")
    present = sorted({names[i] for i in train_ids})
    if len(present) < 2:
        raise ValueError(
            f"the training labels hold a single class ({present[0]!r}); a classifier needs two or more"
        )
    val_texts: list[str] = []
    val_ids: list[int] = []
    if validation is not None:
        if not isinstance(validation, (tuple, list)) or len(validation) != 2:
            raise TypeError("validation must be a (texts, labels) pair or None")
        val_texts, val_ids = _check_data(validation[0], validation[1], names, "validation")
    h = dict(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_length=max_length,
        dropout=dropout,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_fraction=warmup_fraction,
        seed=seed,
    )
    _check_hyperparameters(h, with_tokenizer=tokenizer is not None)
    if tokenizer is not None:
        h.pop("vocab_size")
        h.pop("min_frequency")
    if output_dir is not None:
        output_dir = Path(output_dir)
        check_output_dir(output_dir, overwrite)  # fail before any work
    device = torch.device(device)
    start_time = time.perf_counter()

    if tokenizer is None:
        tokenizer = _classifier_tokenizer(train_texts, vocab_size, min_frequency, max_length)
    torch.manual_seed(seed)
    model = _build_model(tokenizer, names, h).to(device)
    reader = ClassifierOracle(model, tokenizer, 0, batch_size=max(batch_size, 64), device=device)
    train_rows = reader._encode(train_texts)  # exactly as the oracle will encode (truncation included)
    lengths = [len(r) for r in tokenizer(train_texts + val_texts, verbose=False)["input_ids"]]
    truncated = sum(n > max_length for n in lengths)
    pad = model.config.pad_token_id

    steps_per_epoch = math.ceil(len(train_rows) / batch_size)
    total = epochs * steps_per_epoch
    params = list(model.parameters())
    optimizer = adamw(params, learning_rate, weight_decay, matrices_only=True)
    schedule = LRSchedule.from_fraction(learning_rate, total, warmup_fraction, "linear")
    generator = torch.Generator().manual_seed(seed)
    targets = torch.tensor(train_ids, dtype=torch.long)
    history: list[dict[str, Any]] = []
    step = 0
    bar = tqdm(total=total, desc="classifier", disable=not progress)
    try:
        for epoch in range(1, epochs + 1):
            model.train()
            perm = torch.randperm(len(train_rows), generator=generator).tolist()
            losses = []
            for start in range(0, len(perm), batch_size):
                index = perm[start : start + batch_size]
                schedule.apply(optimizer, step)
                ids, mask = _batch(train_rows, index, pad)
                out = model(
                    input_ids=ids.to(device), attention_mask=mask.to(device), labels=targets[index].to(device)
                )
                backward_step(optimizer, out.loss, params, max_grad_norm=1.0)
                losses.append(out.loss.item())
                step += 1
                bar.update(1)
            if not all(math.isfinite(x) for x in losses):
                raise FloatingPointError(
                    f"the training loss became {losses[-1]} in epoch {epoch}; try a smaller learning_rate"
                )
            record = {"epoch": epoch, "train_loss": sum(losses) / len(losses), "validation_accuracy": None}
            if val_texts:
                record["validation_accuracy"] = _accuracy(reader, val_texts, val_ids)
            history.append(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}")
    finally:
        bar.close()
    model.eval()
    result = ClassifierResult(
        model=model,
        tokenizer=tokenizer,
        label_names=names,
        train_accuracy=_accuracy(reader, train_texts, train_ids),
        validation_accuracy=history[-1]["validation_accuracy"],
        num_train=len(train_texts),
        num_validation=len(val_texts),
        num_parameters=sum(p.numel() for p in model.parameters()),
        truncated=truncated,
        wall_seconds=0.0,
        hyperparameters=h,
        history=history,
    )
    if output_dir is None:
        result.wall_seconds = time.perf_counter() - start_time
        return result

    with atomic_directory(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        result.wall_seconds = time.perf_counter() - start_time
        record = {
            "label_names": list(names),
            "hyperparameters": h,
            "metrics": result.metrics(),
            "history": history,
        }
        with open(tmp / CLASSIFIER_FILE, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    result.output_dir = os.fspath(output_dir)
    return result


def evaluate_classifier(
    model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[str | int], batch_size: int = 64
) -> dict[str, Any]:
    """Accuracy of ``model`` on ``texts`` against ``labels`` (class names from ``config.id2label``, or indices).

    Texts are encoded and batched exactly as :class:`~dinado.oracles.ClassifierOracle` does. Returns
    ``{"accuracy", "n", "correct", "per_label": {name: {"n", "accuracy"}}}`` (``per_label`` lists the
    classes present in ``labels``).
    """
    config = model.config
    num_labels = int(getattr(config, "num_labels", 0) or 0)
    names = [str((config.id2label or {}).get(i, i)) for i in range(num_labels)]
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise TypeError(f"labels must be a list, got {type(labels).__name__}")
    texts, labels = list(texts), list(labels)
    if not texts:
        raise ValueError("no texts to evaluate")
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
    ids = []
    for i, label in enumerate(labels):
        if _is_int(label) and 0 <= label < num_labels:
            ids.append(label)
        elif isinstance(label, str) and label in names:
            ids.append(names.index(label))
        else:
            raise ValueError(f"labels[{i}] is {label!r}: not a class of the model ({names}) or an index")
    with eval_mode(model):  # the reader puts the model in eval mode; every submodule's mode comes back
        reader = ClassifierOracle(model, tokenizer, 0, batch_size=batch_size)
        predicted = reader.logits(texts).argmax(dim=-1).tolist()
    correct = [p == y for p, y in zip(predicted, ids, strict=True)]
    per_label = {}
    for k in sorted(set(ids)):
        hits = [c for c, y in zip(correct, ids, strict=True) if y == k]
        per_label[names[k]] = {"n": len(hits), "accuracy": sum(hits) / len(hits)}
    return {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "correct": sum(correct),
        "per_label": per_label,
    }
