"""Baselines that dinado's guides are compared against (e.g. on CommonGen).

* :func:`supervised_finetune` -- supervised fine-tuning on (prompt, target) pairs, the standard way to adapt
  a frozen LM without an oracle: either LoRA (low-rank updates of the linear layers, merged into a plain
  model afterwards) or prompt tuning (a few trained "virtual token" embeddings prepended to every input;
  the base weights stay as they are). The training text mirrors :mod:`dinado.pretrain`'s ``"pairs"``
  format: ``prompt ids + ids of " " + target + EOS``, with the loss on the target and EOS only.
* :func:`best_of_n` -- rejection sampling at test time: draw ``n`` samples per prompt and keep the one the
  oracle scores highest. It needs no training but ``n`` oracle calls per prompt at decoding time.

Both parameter-efficient methods come from PEFT, the well-maintained Hugging Face library that dinado
already uses for its ``dinado-merge`` variant: its LoRA and prompt-tuning implementations are widely used
reference implementations, so the guides are compared against them rather than against a home-made
re-implementation that could be weaker by accident.

One PEFT behaviour needs working around (checked with peft 0.21 and transformers 5.x): for prompt tuning,
``PeftModelForCausalLM`` drops ``position_ids`` (it warns "Position ids are not supported ...") and GPT-2
then numbers positions 0, 1, 2, ... across the padding, so a left-padded row is decoded differently from the
same row unpadded. :func:`supervised_finetune` therefore returns prompt-tuned models wrapped in
:class:`SoftPromptLM`, which feeds the soft prompt as input embeddings with positions taken from the
attention mask, exactly as ``generate()`` does for a plain model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ._utils import LRSchedule, adamw, backward_step, causal_lm_loss, trainable_parameters
from .data import pad_prompts, right_pad
from .hf import eval_mode, is_encoder_decoder, lora_config, position_ids_from_mask, wrap_peft
from .text import PromptFormat, encode_prompts, encode_targets, end_of_turn_id, new_tokens

__all__ = ["METHODS", "SoftPromptLM", "best_of_n", "supervised_finetune"]

METHODS = ("lora", "prompt")
DEFAULT_LEARNING_RATES = {"lora": 1e-3, "prompt": 3e-2}
WARMUP_FRACTION = 0.05


# ---------------------------------------------------------------------------------------------------------
# Prompt tuning as a plain-looking model


class SoftPromptLM(nn.Module):
    """A causal LM with trained soft-prompt embeddings prepended to every input (from PEFT prompt tuning).

    Behaves like the plain base model for what dinado's baselines need: ``forward(input_ids,
    attention_mask)`` returns logits aligned with ``input_ids`` (the virtual positions are cut off), and
    ``generate(input_ids, attention_mask=..., **kwargs)`` returns ``input_ids`` followed by the new tokens
    (``sequences[:, input_ids.shape[1]:]`` are the new tokens), for left-padded batches too. Greedy,
    sampling and beam search work. ``peft_model`` is the underlying PEFT model (``save_pretrained`` saves
    the adapter). Caveat: logits processors that look at earlier tokens (e.g. a repetition penalty) see only
    the generated tokens, not the prompt, since the prompt goes in as embeddings.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        config = peft_model.active_peft_config
        if not config.is_prompt_learning or config.peft_type.value != "PROMPT_TUNING":
            raise TypeError(f"SoftPromptLM needs a PEFT prompt-tuning model, got {config.peft_type}")
        self.peft_model = peft_model
        self.num_virtual_tokens = int(config.num_virtual_tokens)

    @property
    def base(self) -> nn.Module:
        """The frozen transformers model inside."""
        return self.peft_model.get_base_model()

    @property
    def config(self):
        return self.base.config

    @property
    def generation_config(self):
        return self.base.generation_config

    @property
    def device(self) -> torch.device:
        return self.base.device

    def max_positions(self) -> int | None:
        """Positions left for real tokens (the model's limit less the virtual tokens); None if unknown."""
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        return None if limit is None else int(limit) - self.num_virtual_tokens

    def _inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        batch = input_ids.shape[0]
        embeds = self.peft_model.word_embeddings(input_ids)
        prompt = self.peft_model.get_prompt(batch_size=batch).to(device=embeds.device, dtype=embeds.dtype)
        ones = attention_mask.new_ones(batch, self.num_virtual_tokens)
        return torch.cat([prompt, embeds], 1), torch.cat([ones, attention_mask], 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """The base model's output with the soft prompt in front; ``logits`` cover ``input_ids`` only."""
        embeds, mask = self._inputs(input_ids, attention_mask)
        out = self.base(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        )
        out.logits = out.logits[:, self.num_virtual_tokens :]
        return out

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """``generate()`` of the base model with the soft prompt; returns what a plain model's would."""
        if "inputs_embeds" in kwargs:
            raise TypeError("SoftPromptLM.generate takes input_ids, not inputs_embeds")
        limit, new = self.max_positions(), kwargs.get("max_new_tokens")
        if limit is not None and new is not None and input_ids.shape[1] + new > limit:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens + max_new_tokens={new} exceeds the {limit} positions "
                f"left after {self.num_virtual_tokens} virtual tokens: lower max_new_tokens or shorten the prompts"
            )
        embeds, mask = self._inputs(input_ids, attention_mask)
        # given only embeddings, generate() returns only the new tokens: put the prompt ids back in front
        out = self.base.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        per_row = sequences.shape[0] // input_ids.shape[0]  # num_return_sequences
        full = torch.cat([input_ids.repeat_interleave(per_row, 0).to(sequences.device), sequences], 1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out


# ---------------------------------------------------------------------------------------------------------
# Supervised fine-tuning


def _max_positions(model: nn.Module) -> int | None:
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return None if limit is None else int(limit)


def _training_rows(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    limit: int | None,
    prompt_format: PromptFormat | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Right-padded ids, attention mask and labels (-100 on prompt and padding); the truncated-row count.

    Plain prompts: ``prompt + " " + target + EOS``. A ``prompt_format`` formats the prompt as the model will
    read it (a chat template opens the assistant turn, which the target then fills, ended by end of turn)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompt_ids = encode_prompts(tokenizer, prompts, prompt_format=prompt_format)
    # each target ends with EOS, or with the end-of-turn token in a chat
    target_ids = encode_targets(tokenizer, targets, prompt_format=prompt_format)
    rows, learn, truncated = [], [], 0
    for p, t in zip(prompt_ids, target_ids, strict=True):
        row, keep = [*p, *t], [False] * len(p) + [True] * len(t)
        if limit is not None and len(row) > limit:
            row, keep = row[:limit], keep[:limit]
            truncated += 1
        if not any(keep[1:]):  # nothing left to predict (the first token has no context)
            continue
        rows.append(row)
        learn.append(keep)
    if not rows:
        raise ValueError(f"no trainable rows: every prompt fills the model's {limit} positions")
    ids, mask = right_pad(rows, pad)
    targets = [
        [t if k else -100 for t, k in zip(row, keep, strict=True)]
        for row, keep in zip(rows, learn, strict=True)
    ]
    labels, _ = right_pad(targets, -100)
    return ids, mask, labels, truncated


def _seq2seq_rows(
    tokenizer, prompts: Sequence[str], targets: Sequence[str], limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Encoder ids and mask (right-padded sources) and decoder labels (target + EOS, -100 on padding)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sources = encode_prompts(tokenizer, prompts, encoder_decoder=True)
    labels = encode_targets(tokenizer, targets, encoder_decoder=True)
    truncated = 0
    if limit is not None:
        truncated = sum(len(s) > limit or len(t) > limit for s, t in zip(sources, labels, strict=True))
        sources, labels = [s[:limit] for s in sources], [t[:limit] for t in labels]
    ids, mask = right_pad(sources, pad)
    label_ids, label_mask = right_pad(labels, pad)
    return ids, mask, label_ids.masked_fill(label_mask == 0, -100), truncated


def _check_finetune_args(method, prompts, targets, max_steps, batch_size, learning_rate, lora_r, vt) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(map(repr, METHODS))}")
    if isinstance(prompts, str) or isinstance(targets, str):
        raise TypeError("prompts and targets must be sequences of strings, not one string")
    if len(prompts) != len(targets):
        raise ValueError(
            f"prompts and targets must have the same length, got {len(prompts)} and {len(targets)}"
        )
    if len(prompts) == 0:
        raise ValueError("no training data: prompts and targets are empty")
    for name, value in (("max_steps", max_steps), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if learning_rate is not None and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if method == "lora" and lora_r < 1:
        raise ValueError(f"lora_r must be at least 1, got {lora_r}")
    if method == "prompt" and vt < 1:
        raise ValueError(f"num_virtual_tokens must be at least 1, got {vt}")


def supervised_finetune(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    method: str = "lora",
    max_steps: int = 200,
    batch_size: int = 32,
    learning_rate: float | None = None,
    seed: int = 0,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_target_modules: str | list[str] = "all-linear",
    num_virtual_tokens: int = 8,
    progress: bool = False,
    prompt_format: PromptFormat | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of ``model`` on ``(prompt, target)`` pairs with LoRA or prompt tuning.

    Each example is ``tokenizer(prompt) + tokenizer(" " + target) + [EOS]`` (no special tokens added), the
    loss taken on the target and EOS tokens only; batches are right-padded. An encoder-decoder ``model``
    (Marian, T5, BART) reads the prompt as its source (:func:`dinado.text.encode_prompts`) and learns
    ``tokenizer(target) + [EOS]`` as its decoder labels; only ``method="lora"`` applies to it. A
    ``prompt_format`` (decoder-only) formats each prompt as generation will (:class:`dinado.text.PromptFormat`);
    with a chat template the target fills the assistant turn and ends with the end-of-turn token. ``model``
    itself is never changed: a deep copy is trained (so memory holds two models).

    ``method="lora"`` (default learning rate 1e-3) trains LoRA adapters (``lora_r``, ``lora_alpha``, on
    ``lora_target_modules``), merges them and returns the plain merged model. ``method="prompt"`` (default
    learning rate 3e-2) trains ``num_virtual_tokens`` randomly initialised soft-prompt embeddings and returns
    a :class:`SoftPromptLM`. Either way the returned model is in eval mode and ``generate(input_ids,
    attention_mask=..., ...)`` returns the prompt ids followed by the new tokens, as for the base model.

    Optimisation: ``max_steps`` AdamW steps (no weight decay) over batches of ``batch_size`` rows drawn epoch
    by epoch in a seeded random order, gradient norm clipped to 1.0, learning rate warmed up linearly over
    the first 5% of the steps and then decayed to zero on a cosine. Dropout of the base model is active while
    training. The same ``seed`` gives the same result. Rows longer than the model's positions (less the
    virtual tokens) are cut from the right and counted in ``info["truncated"]``; a row left with nothing to
    predict is dropped.

    Returns ``(model, info)`` with ``info`` keys ``method``, ``steps``, ``batch_size``, ``train_loss_first`` and
    ``train_loss_last`` (the loss of the first and of the last step's batch), ``wall_seconds``,
    ``trainable_parameters``, ``examples`` (rows trained on) and ``truncated``.
    """
    from peft import PromptTuningConfig

    _check_finetune_args(
        method, prompts, targets, max_steps, batch_size, learning_rate, lora_r, num_virtual_tokens
    )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id: set one (GPT-2 style: pad = eos)")
    lr = DEFAULT_LEARNING_RATES[method] if learning_rate is None else float(learning_rate)
    start_time = time.perf_counter()

    seq2seq = is_encoder_decoder(model)
    if seq2seq and method != "lora":
        raise ValueError(
            f"method={method!r} is for decoder-only models; fine-tune an encoder-decoder base with method='lora'"
        )
    limit = _max_positions(model)
    if method == "prompt" and limit is not None:
        limit -= num_virtual_tokens
        if limit < 2:
            raise ValueError(
                f"num_virtual_tokens={num_virtual_tokens} leaves no room in the model's positions"
            )
    if seq2seq:
        if prompt_format is not None and not prompt_format.is_plain:
            raise ValueError(
                "prompt_format applies to decoder-only models; an encoder-decoder base reads the source"
            )
        ids, mask, labels, truncated = _seq2seq_rows(tokenizer, prompts, targets, limit)
    else:
        ids, mask, labels, truncated = _training_rows(tokenizer, prompts, targets, limit, prompt_format)

    torch.manual_seed(seed)
    work = copy.deepcopy(model)
    if method == "lora":
        peft_config = lora_config(work, lora_r, lora_alpha, 0.0, lora_target_modules)
        trained = wrap_peft(work, peft_config)
    else:
        peft_config = PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="RANDOM"
        )
        trained = SoftPromptLM(wrap_peft(work, peft_config))
    params = trainable_parameters(trained)
    device = next(trained.parameters()).device
    optimizer = adamw(params, lr, weight_decay=0.0)
    schedule = LRSchedule.from_fraction(lr, max_steps, WARMUP_FRACTION, "cosine")
    generator = torch.Generator().manual_seed(seed)

    losses: list[float] = []
    trained.train()
    bar = tqdm(total=max_steps, desc=f"finetune ({method})", disable=not progress)
    try:
        while len(losses) < max_steps:
            order = torch.randperm(len(ids), generator=generator)
            for start in range(0, len(order), batch_size):
                if len(losses) >= max_steps:
                    break
                index = order[start : start + batch_size]
                schedule.apply(optimizer, len(losses))
                if seq2seq:
                    width = int(mask[index].sum(1).max())
                    target_width = int((labels[index] != -100).sum(1).max())
                    loss = trained(
                        input_ids=ids[index, :width].to(device),
                        attention_mask=mask[index, :width].to(device),
                        labels=labels[index, :target_width].to(device),
                    ).loss
                else:
                    width = int(mask[index].sum(1).max())
                    batch = (t[index, :width].to(device) for t in (ids, mask, labels))
                    loss = causal_lm_loss(trained, *batch)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"the training loss is {loss.item()} at step {len(losses)}")
                backward_step(optimizer, loss, params, max_grad_norm=1.0)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        bar.close()

    if method == "lora":
        result = trained.merge_and_unload()
    else:
        result = trained
        result.requires_grad_(False)
    result.eval()
    info = {
        "method": method,
        "steps": len(losses),
        "batch_size": batch_size,
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "wall_seconds": time.perf_counter() - start_time,
        "trainable_parameters": sum(p.numel() for p in params),
        "examples": len(ids),
        "truncated": truncated,
    }
    return result, info


# ---------------------------------------------------------------------------------------------------------
# Best-of-n (rejection sampling against the oracle)


@torch.no_grad()
def best_of_n(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    n: int,
    score: Callable[[list[str], list[str]], Sequence[float]],
    max_new_tokens: int,
    batch_size: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
    prompt_format: PromptFormat | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """For each prompt, draw ``n`` samples and return the one ``score`` rates highest.

    Samples come from ``model.generate`` (pure ancestral sampling: ``top_k=0``, ``top_p=1``, the given
    ``temperature``) on left-padded batches of ``batch_size`` rows, each prompt's ``n`` rows next to each
    other; ``torch.manual_seed(seed)`` is set once at the start. A completion is the text of the new tokens
    up to the first EOS, decoded with ``skip_special_tokens=True`` and stripped. ``score(prompts_repeated,
    completions)`` is called once on all ``n * len(prompts)`` completions (higher is better); among ties the
    earliest sample wins. A ``prompt_format`` formats each prompt as :func:`dinado.text.generate_texts` does
    (a chat template: generation ends at its end-of-turn token); ``score`` still reads the prompt lines.

    Returns ``(chosen, info)`` with ``info["oracle_calls"] = n * len(prompts)``, ``info["accepted"]`` (the
    share of prompts whose chosen completion scores at least 1.0, i.e. fully satisfies a [0, 1] oracle) and
    ``info["wall_seconds"]``.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    for name, value in (("n", n), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if len(prompts) == 0:
        raise ValueError("no prompts given")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: set one (GPT-2 style: pad = eos)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if prompt_format is not None and prompt_format.chat:
        eos = end_of_turn_id(tokenizer)
    start_time = time.perf_counter()

    seq2seq = is_encoder_decoder(model)
    if seq2seq:
        encoded = encode_prompts(tokenizer, prompts, encoder_decoder=True)
    elif prompt_format is not None and not prompt_format.is_plain:
        encoded = encode_prompts(tokenizer, prompts, prompt_format=prompt_format)
    else:
        encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
        for prompt, ids in zip(prompts, encoded, strict=True):
            if not ids:
                raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    rows = [ids for ids in encoded for _ in range(n)]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    completions: list[str] = []
    with eval_mode(model):  # no dropout while sampling; every submodule's mode comes back afterwards
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_prompts(rows[start : start + batch_size], pad, seq2seq)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            for new in new_tokens(out, ids.shape[1], seq2seq).tolist():
                if eos in new:
                    new = new[: new.index(eos)]
                completions.append(tokenizer.decode(new, skip_special_tokens=True).strip())

    repeated = [p for p in prompts for _ in range(n)]
    scores = [float(s) for s in score(repeated, completions)]
    if len(scores) != len(completions):
        raise ValueError(f"score returned {len(scores)} values for {len(completions)} completions")
    if any(math.isnan(s) for s in scores):
        raise ValueError("score returned NaN")
    chosen, accepted = [], 0
    for i in range(len(prompts)):
        group = scores[i * n : (i + 1) * n]
        best = max(range(n), key=lambda j: (group[j], -j))  # first among ties
        chosen.append(completions[i * n + best])
        accepted += group[best] >= 1.0
    info = {
        "oracle_calls": n * len(prompts),
        "accepted": accepted / len(prompts),
        "wall_seconds": time.perf_counter() - start_time,
    }
    return chosen, info
