"""Text in, text out: tokenise prompts and decode them in batches with a base model or a guide.

Decoder-only bases read ``prompt + completion`` in one left-padded sequence; encoder-decoder bases read the
prompt (the source) in the encoder, right-padded, and write the completion after the decoder start token.
These helpers hide that difference from the CLI, the baselines and the benchmarks.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .guide import Guide, eval_mode, is_encoder_decoder
from .samples import left_pad, right_pad


def _looks_like_path(name: str) -> bool:
    """True for a name that can only be a local path (a hub id is ``name`` or ``org/name``)."""
    if name.startswith(("/", "./", "../", "~", ".")) or "\\" in name or name.count("/") > 1:
        return True
    head, sep, _ = name.partition("/")
    return bool(sep) and Path(head).is_dir()  # runs/base, where ./runs exists


def check_local_model(name_or_path: str) -> None:
    """Fail at once, with a hint, on a local path that holds no transformers model (never ask the hub)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if _looks_like_path(name_or_path):
            raise FileNotFoundError(
                f"no such directory: {name_or_path} (a local model path; check the path, or give a hub id "
                "such as 'gpt2' or 'org/name')"
            )
        return
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name_or_path} is a file: give the directory of a saved model (config.json and weights)"
        )
    if (path / "config.json").is_file():
        return
    hint = "give the directory that holds the model's config.json and weights"
    if (path / "guide" / "dinado_config.json").is_file():
        hint = (
            f"it is a `dinado train` run: pass {path / 'guide'} as --guide and the base it was trained on as "
            "--base"
        )
    elif (path / "dinado_config.json").is_file():
        hint = "it is a saved guide: pass it as --guide and the base it was trained on as --base"
    elif (path / "model" / "config.json").is_file():
        hint = f"the model is in {path / 'model'}"
    elif (path / "samples.safetensors").is_file():
        hint = "it is a `dinado sample` run: pass it as --samples"
    raise FileNotFoundError(f"{name_or_path} holds no config.json, so it is not a saved model: {hint}")


def load_model(name_or_path: str, tokenizer: str | None = None) -> tuple[Any, Any]:
    """A base model and its tokenizer by hub id or local path, in eval mode, with a pad token.

    ``AutoModelForSeq2SeqLM`` for an encoder-decoder config (Marian, T5, BART), else ``AutoModelForCausalLM``;
    a tokenizer without a pad token pads with EOS (GPT-2 style).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    check_local_model(name_or_path)
    seq2seq = getattr(AutoConfig.from_pretrained(name_or_path), "is_encoder_decoder", False)
    model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(name_or_path)
    tok = AutoTokenizer.from_pretrained(tokenizer or name_or_path)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def encode_prompts(tokenizer, prompts: Sequence[str], encoder_decoder: bool = False) -> list[list[int]]:
    """Token ids of each prompt.

    Decoder-only: plain tokenisation without special tokens; an empty prompt becomes the BOS token (GPT-2
    style models start there). Encoder-decoder: the tokenizer's own special tokens are added (Marian and T5
    end a source with EOS, BART wraps it in BOS/EOS), and EOS is appended when the tokenizer adds none.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if encoder_decoder:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id, which ends every encoder input: set one")
        rows = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        return [list(row) if row and row[-1] == eos else [*row, eos] for row in rows]
    rows = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [list(row) if row else [bos] for row in rows]


def pad_prompts(
    rows: Sequence[Sequence[int]], pad_id: int, encoder_decoder: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and mask as ``generate()`` wants them: left-padded, or right-padded for an encoder."""
    return (right_pad if encoder_decoder else left_pad)(rows, pad_id)


def new_tokens(sequences: torch.Tensor, prompt_width: int, encoder_decoder: bool) -> torch.Tensor:
    """The generated part of ``generate()``'s output: after the prompt, or after the decoder start token."""
    return sequences[:, 1:] if encoder_decoder else sequences[:, prompt_width:]


def generate_texts(
    source, tokenizer, prompts: list[str], batch_size: int = 32, alpha: float = 1.0, **generate_kwargs: Any
) -> tuple[list[str], int, float]:
    """Decode ``prompts`` with a base model or a Guide: (completions, new tokens, seconds)."""
    from .decoding import check_length
    from .decoding import generate as guided_generate

    model = source.base if isinstance(source, Guide) else source
    seq2seq = is_encoder_decoder(model)
    rows = encode_prompts(tokenizer, prompts, seq2seq)
    check_length(model, max(map(len, rows)), generate_kwargs.get("max_new_tokens"))
    outputs, count, start = [], 0, time.perf_counter()
    with eval_mode(source):  # no dropout while decoding; the caller's modes come back afterwards
        for i in range(0, len(rows), batch_size):
            ids, mask = pad_prompts(rows[i : i + batch_size], tokenizer.pad_token_id, seq2seq)
            if isinstance(source, Guide):
                seqs = guided_generate(source, ids, mask, alpha=alpha, **generate_kwargs)
            else:
                seqs = source.generate(ids, attention_mask=mask, **generate_kwargs)
            gen = new_tokens(seqs, ids.shape[1], seq2seq)
            count += int((gen != tokenizer.pad_token_id).sum())
            outputs.extend(t.strip() for t in tokenizer.batch_decode(gen, skip_special_tokens=True))
    return outputs, count, time.perf_counter() - start
