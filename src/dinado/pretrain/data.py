"""The data of :func:`dinado.pretrain.pretrain`: reading text and pairs, the held-out split, the byte-level BPE
tokenizer, and the right-padded rows (token ids, attention mask, labels) the model is trained on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import right_pad
from .config import EOS_TOKEN, PretrainConfig

__all__ = ["build_tokenizer", "read_pairs", "read_text_lines"]


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


def _train_tokenizer(config: PretrainConfig, train_examples: list):
    """The tokenizer trained on the training examples as the model will read them."""
    if config.architecture == "marian":
        texts = [p for p, _ in train_examples] + [t for _, t in train_examples]
    elif config.data_format == "pairs":
        texts = [_prompt_text(p, config.prompt_suffix) + " " + t for p, t in train_examples]
    else:
        texts = list(train_examples)
    return build_tokenizer(
        texts,
        config.vocab_size,
        config.min_frequency,
        config.context,
        append_eos=config.architecture == "marian",  # tokenizer(source) = what the encoder was trained on
    )


def _rows(config: PretrainConfig, examples: list, tokenizer) -> _Rows | _Seq2SeqRows:
    """``examples`` as the rows the model is trained (or evaluated) on."""
    if config.architecture == "marian":
        return _seq2seq_rows(examples, tokenizer, config.context)
    if config.data_format == "pairs":
        return _pair_rows(examples, tokenizer, config.context, config.prompt_suffix, config.prompt_loss)
    return _text_rows(examples, tokenizer, config.context, config.pack)
