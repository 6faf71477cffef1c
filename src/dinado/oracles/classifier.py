"""A sequence classifier as an oracle: :class:`ClassifierOracle` (transformers models, batched by length)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .base import OracleBase, check_text
from .registry import check_keys, register_oracle


class ClassifierOracle(OracleBase):
    """P(``label`` | completion) from a transformers sequence-classification model.

    ``soft=True``: the probability itself. ``threshold=t``: 1.0 when the probability is >= t, else 0.0.
    Neither: 1.0 when ``label`` is the most probable class (for multi-label models: probability >= 0.5).
    ``label`` is a class name from ``config.id2label``/``label2id`` or a class index. Probabilities are a
    softmax over the logits (a sigmoid for ``problem_type="multi_label_classification"``).
    ``include_prompt=True`` classifies prompt + completion instead of the completion alone. The model is
    put in eval mode, and scores in eval mode even if put back in training later (its modes are restored
    after each call); inputs are padded on the right with ``config.pad_token_id``. A model without one (GPT-2)
    is run one text at a time: set ``model.config.pad_token_id`` (for GPT-2, to the EOS id) to batch. An empty
    text is fed as one BOS/EOS token.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        label: str | int,
        *,
        threshold: float | None = None,
        soft: bool = False,
        batch_size: int = 32,
        max_length: int | None = None,
        include_prompt: bool = False,
        device: Any = None,
    ) -> None:
        import torch

        if soft and threshold is not None:
            raise ValueError("give threshold or soft=True, not both: soft returns the probability itself")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise TypeError(f"threshold must be a number in [0, 1] or None, got {threshold!r}")
            if not (math.isfinite(threshold) and 0 <= threshold <= 1):
                raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
            threshold = float(threshold)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        config = model.config
        self.num_labels = int(getattr(config, "num_labels", 0) or 0)
        if self.num_labels < 2:
            raise ValueError(
                f"ClassifierOracle needs a classification head with >= 2 labels; this model has "
                f"{self.num_labels} (a single output is a regression head)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = label
        self.label_index, self.label_name = self._resolve_label(config, label)
        self.threshold = threshold
        self.soft = bool(soft)
        self.batch_size = batch_size
        self.include_prompt = bool(include_prompt)
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.max_length_arg = max_length
        self.max_length = max_length if max_length is not None else self._default_max_length()
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.name_or_path: str | None = getattr(config, "name_or_path", None) or None
        self.tokenizer_name_or_path: str | None = getattr(tokenizer, "name_or_path", None) or None

    # the constructor's options that from_pretrained passes on (its other keyword arguments go to the model)
    OPTIONS = ("threshold", "soft", "batch_size", "max_length", "include_prompt")

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, label: str | int, *, tokenizer: Any = None, device: Any = None, **kwargs: Any
    ) -> ClassifierOracle:
        """Load the model (and, unless given, its tokenizer) with the transformers Auto classes.

        ``threshold``, ``soft``, ``batch_size``, ``max_length`` and ``include_prompt`` are the constructor's;
        the other keyword arguments go to ``AutoModelForSequenceClassification.from_pretrained``.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        options = {k: kwargs.pop(k) for k in cls.OPTIONS if k in kwargs}
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer_path = tokenizer or name_or_path
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **kwargs)
        if device is not None:
            model = model.to(device)
        oracle = cls(model, tokenizer, label, device=device, **options)
        oracle.name_or_path = name_or_path
        return oracle

    @staticmethod
    def _resolve_label(config: Any, label: str | int) -> tuple[int, str]:
        id2label = {int(i): str(name) for i, name in (getattr(config, "id2label", None) or {}).items()}
        names = {name: i for i, name in id2label.items()}
        names.update({str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()})
        num_labels = int(config.num_labels)
        if isinstance(label, bool):
            raise TypeError(f"label must be a class name or index, got {label!r}")
        if isinstance(label, int):
            if not 0 <= label < num_labels:
                raise ValueError(f"label index {label} is out of range: the model has {num_labels} labels")
            return label, id2label.get(label, str(label))
        if isinstance(label, str):
            if label in names:
                return names[label], label
            folded = [n for n in names if n.casefold() == label.casefold()]
            if len(folded) == 1:
                return names[folded[0]], folded[0]
            available = sorted(names, key=names.get)
            raise ValueError(
                f"unknown label {label!r}; the model's labels are {available} (or give an index 0..{num_labels - 1})"
            )
        raise TypeError(f"label must be a class name or index, got {label!r}")

    def _default_max_length(self) -> int | None:
        limits = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and tok_max < 1_000_000:
            limits.append(tok_max)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(self.model.config, key, None)
            if isinstance(value, int) and value > 0:
                limits.append(value)
        return min(limits) if limits else None

    def _encode(self, texts: list[str]) -> list[list[int]]:
        kwargs: dict[str, Any] = {}
        if self.max_length is not None:
            kwargs = {"truncation": True, "max_length": self.max_length}
        rows = [list(ids) for ids in self.tokenizer(texts, **kwargs)["input_ids"]]
        fill = None
        for attr in ("bos_token_id", "eos_token_id", "cls_token_id", "pad_token_id"):
            fill = getattr(self.tokenizer, attr, None)
            if fill is not None:
                break
        for i, row in enumerate(rows):
            if not row:
                if fill is None:
                    raise ValueError(f"text {i} encodes to no tokens and the tokenizer has no BOS/EOS token")
                rows[i] = [int(fill)]
        return rows

    def _batches(self, rows: list[list[int]]) -> Iterable[list[int]]:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths: little padding
        size = self.batch_size if getattr(self.model.config, "pad_token_id", None) is not None else 1
        for start in range(0, len(order), size):
            yield order[start : start + size]

    def logits(self, texts: Sequence[str]) -> Any:
        """The model's logits ``[len(texts), num_labels]`` (float32, on the CPU), in the order given."""
        import torch

        from ..data import right_pad
        from ..hf import eval_mode

        check_text(texts, "texts")
        rows = self._encode(list(texts))
        pad = getattr(self.model.config, "pad_token_id", None)
        out = torch.zeros((len(rows), self.num_labels), dtype=torch.float32)
        with torch.inference_mode(), eval_mode(self.model):
            for batch in self._batches(rows):
                ids, mask = right_pad([rows[i] for i in batch], pad if pad is not None else 0)
                result = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
                out[torch.tensor(batch)] = result.logits.float().cpu()
        return out

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        """P(label | text) for each text."""
        import torch

        logits = self.logits(texts)
        p = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return p[:, self.label_index].tolist()

    @property
    def text_inputs(self) -> tuple[str, ...]:
        return ("completions", "prompts") if self.include_prompt else ("completions",)

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        if self.include_prompt:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        else:
            texts = list(completions)
        if not texts:
            return []
        if self.soft:
            return self.probabilities(texts)
        if self.threshold is not None:
            return [float(p >= self.threshold) for p in self.probabilities(texts)]
        if self.multi_label:
            return [float(p >= 0.5) for p in self.probabilities(texts)]
        return [float(i == self.label_index) for i in self.logits(texts).argmax(dim=-1).tolist()]

    def __repr__(self) -> str:
        name = self.name_or_path or type(self.model).__name__
        if self.soft:
            rule = "soft=True"
        elif self.threshold is not None:
            rule = f"threshold={self.threshold}"
        else:
            rule = "argmax"
        prompt = ", include_prompt=True" if self.include_prompt else ""
        return f"ClassifierOracle({name!r}, label={self.label_name!r} (index {self.label_index}), {rule}{prompt})"

    def to_config(self) -> dict[str, Any]:
        if not self.name_or_path:
            raise ValueError(
                f"{self!r} cannot be written as a config: the model has no name or path "
                "(save it with save_pretrained and load it with ClassifierOracle.from_pretrained)"
            )
        config: dict[str, Any] = {"type": "classifier", "model": self.name_or_path}
        if self.tokenizer_name_or_path and self.tokenizer_name_or_path != self.name_or_path:
            config["tokenizer"] = self.tokenizer_name_or_path
        config.update(
            label=self.label,
            threshold=self.threshold,
            soft=self.soft,
            batch_size=self.batch_size,
            max_length=self.max_length_arg,
            include_prompt=self.include_prompt,
        )
        return config


def _build_classifier(c: Mapping, where: str) -> ClassifierOracle:
    options = {*ClassifierOracle.OPTIONS, "device"}
    check_keys(c, {"model", "label"}, options | {"tokenizer"}, where)
    kwargs = {k: c[k] for k in options if k in c}
    return ClassifierOracle.from_pretrained(c["model"], c["label"], tokenizer=c.get("tokenizer"), **kwargs)


register_oracle("classifier", _build_classifier)
