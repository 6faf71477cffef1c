"""Metrics on generated text: oracle success and coverage, BLEU, base perplexity, distinct-n, length;
training-curve plots and a markdown report."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._utils import atomic_file
from .data import right_pad
from .hf import accepts_argument, decoder_start_token_id, eval_mode, is_encoder_decoder
from .oracles import call_oracle
from .text import PromptFormat, encode_prompts


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens (0 when there are none)."""
    grams = [
        tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else 0.0


def _logits_from(model, ids: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
    """A causal LM's logits at positions ``first`` to the end of each row, ``[B, L - first, V]`` (float32). The
    LM head runs at those positions only when the model takes ``logits_to_keep`` (transformers' causal LMs):
    over a 49k vocabulary it costs as much as the body, and scoring reads only the completions' positions."""
    if not 0 <= first < ids.shape[1]:
        raise ValueError(f"first position {first} outside rows of {ids.shape[1]} tokens")
    if accepts_argument(model, "logits_to_keep"):
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1] - first).logits
    else:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, first:]
    return logits.float()


@torch.no_grad()
def base_perplexity(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 16,
    prompt_format: PromptFormat | None = None,
) -> float:
    """exp(mean negative log-likelihood per completion token) under the base model, given each prompt.

    Only tokens inside the model's position window are scored. An encoder-decoder model reads each prompt
    as its source and the completion after the decoder start token. ``prompt_format`` (a template, a chat
    template) gives the prompt as the model read it when it wrote the completions. The model is read in eval
    mode (no dropout); its own mode, submodule by submodule, is restored afterwards."""
    with eval_mode(model):
        if is_encoder_decoder(model):
            return _seq2seq_perplexity(model, tokenizer, prompts, completions, batch_size, prompt_format)
        return _causal_perplexity(model, tokenizer, prompts, completions, batch_size, prompt_format)


def _causal_perplexity(model, tokenizer, prompts, completions, batch_size: int, prompt_format=None) -> float:
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 10**9
    for start in range(0, len(prompts), batch_size):
        rows, spans = [], []
        for prompt, completion in zip(
            prompts[start : start + batch_size], completions[start : start + batch_size], strict=True
        ):
            p = encode_prompts(tokenizer, [prompt], False, prompt_format)[0] or [bos]
            space = "" if prompt_format is not None and prompt_format.chat else " "  # a chat turn starts anew
            c = tokenizer(space + completion.strip() if completion.strip() else "", add_special_tokens=False)[
                "input_ids"
            ]
            row = (p + c)[:limit]  # tokens past the model's window are not scored
            rows.append(row)
            spans.append((len(p), len(row)))
        scored = [(r, a, b) for r, (a, b) in enumerate(spans) if b > a]
        if not scored:
            continue
        ids, mask = right_pad(rows, tokenizer.pad_token_id or 0)
        first = min(a for _, a, _ in scored) - 1  # the earliest position that predicts a completion token
        log_p = F.log_softmax(_logits_from(model, ids.to(device), mask.to(device), first)[:, :-1], -1)
        token_lp = log_p.gather(-1, ids[:, first + 1 :, None].to(device)).squeeze(-1).cpu()
        for r, a, b in scored:
            total_nll -= float(token_lp[r, a - 1 - first : b - 1 - first].sum())
            total_tokens += b - a
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


@torch.no_grad()
def completion_log_probs(
    model, samples, indices: Sequence[int], pad_id: int = 0, batch_size: int = 16
) -> list[torch.Tensor]:
    """A decoder-only model's next-token log-probabilities (float32, ``[completion length, vocab]``) at the
    positions that predict each completion token of ``samples`` (a :class:`~dinado.data.SampleSet`) at
    ``indices``, teacher-forced after its prompt (right-padded batches: every row keeps its own positions)."""
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        ids, mask = right_pad([samples.prompts[i] + samples.completions[i] for i in chunk], pad_id)
        first = min(len(samples.prompts[i]) for i in chunk) - 1
        logits = _logits_from(model, ids.to(device), mask.to(device), first)
        for row, i in enumerate(chunk):
            start, n = len(samples.prompts[i]) - 1 - first, len(samples.completions[i])
            out.append(F.log_softmax(logits[row, start : start + n], dim=-1).cpu())
    return out


def mean_entropy(log_probs: Sequence[torch.Tensor]) -> float:
    """Mean entropy (nats) of the next-token distributions given as rows of log-probabilities."""
    rows = torch.cat(list(log_probs))
    return float(-(rows.exp() * rows).sum(-1).mean())


def _seq2seq_perplexity(model, tokenizer, prompts, completions, batch_size: int, prompt_format=None) -> float:
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    start_id = decoder_start_token_id(model)
    pad = tokenizer.pad_token_id or 0
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None) or 10**9
    sources = [row[:limit] for row in encode_prompts(tokenizer, prompts, True, prompt_format)]
    targets = [
        [start_id, *tokenizer(c.strip(), add_special_tokens=False)["input_ids"]][:limit] for c in completions
    ]
    for start in range(0, len(prompts), batch_size):
        ids, mask = right_pad(sources[start : start + batch_size], pad)
        dec, dec_mask = right_pad(targets[start : start + batch_size], pad)
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            decoder_input_ids=dec.to(device),
            decoder_attention_mask=dec_mask.to(device),
        ).logits
        token_lp = (
            F.log_softmax(logits.float(), -1)[:, :-1].gather(-1, dec[:, 1:, None].to(device)).squeeze(-1)
        )
        scored = dec_mask[:, 1:].to(device).bool()
        total_nll -= float(token_lp[scored].sum())
        total_tokens += int(scored.sum())
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")


def evaluate_texts(
    prompts: Sequence[str],
    completions: Sequence[str],
    oracle: Callable | None = None,
    references: Sequence[Sequence[str]] | None = None,
    model: Any = None,
    tokenizer: Any = None,
    prompt_format: PromptFormat | None = None,
) -> dict[str, float]:
    """Every metric that applies: success (oracle mean), keyword coverage, BLEU, base perplexity, distinct-n.

    ``prompts`` are what the oracle judges (the prompts-file lines); ``prompt_format`` is how the model read
    them (for the base perplexity)."""
    metrics: dict[str, float] = {"count": float(len(completions))}
    if oracle is not None:
        values = call_oracle(oracle, list(prompts), list(completions))
        metrics["success"] = sum(values) / len(values)
        if hasattr(oracle, "coverage"):
            cover = oracle.coverage(list(prompts), list(completions))
            flat = [c for row in cover for c in row]
            metrics["coverage"] = sum(flat) / len(flat) if flat else float("nan")
    if references is not None:
        import sacrebleu

        if len(references) != len(completions):
            raise ValueError(f"{len(references)} reference sets for {len(completions)} outputs")
        width = max(len(r) for r in references)
        streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
        metrics["bleu"] = sacrebleu.corpus_bleu(list(completions), streams).score
    if model is not None and tokenizer is not None:
        metrics["base_perplexity"] = base_perplexity(
            model, tokenizer, prompts, completions, prompt_format=prompt_format
        )
    metrics["distinct_1"] = distinct_n(completions, 1)
    metrics["distinct_2"] = distinct_n(completions, 2)
    metrics["mean_words"] = sum(len(c.split()) for c in completions) / max(len(completions), 1)
    return metrics


def plot_training_curves(records: Sequence[dict[str, float]], path: str | os.PathLike) -> None:
    """Loss, regulariser (and validation success when logged) against step, from metrics.jsonl (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss", "regularizer"] + (["val_success"] if any("val_success" in r for r in records) else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2))
    for ax, key in zip(axes, keys, strict=True):
        points = [(r["step"], r[key]) for r in records if "step" in r and key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if key == "val_success" else None)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    save_figure(fig, path)


def save_figure(fig, path, dpi: int = 100) -> None:
    """Write a matplotlib figure to ``path`` as PNG atomically (temp file + rename), then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


SMALL_SAMPLE = 200  # below this many outputs per system the report warns that rates are noisy


def markdown_report(
    metrics: dict[str, dict[str, float]], examples: Sequence[dict[str, str]], columns: Sequence[str]
) -> str:
    """A metrics table (one row per system) and example outputs side by side."""
    keys = sorted({k for m in metrics.values() for k in m})
    lines = [
        "# dinado evaluation",
        "",
        "| system | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for name, values in metrics.items():
        cells = [f"{values[k]:.4g}" if k in values else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    counts = [int(v["count"]) for v in metrics.values() if "count" in v]
    if counts and min(counts) < SMALL_SAMPLE:
        n = min(counts)
        half_width = 100 * 1.96 * math.sqrt(0.25 / n)  # the widest 95% interval of a rate, at p = 0.5
        lines += [
            "",
            f"**Small sample:** {n} output{'s' if n != 1 else ''} per system. A success rate measured on {n} "
            f"outputs has a 95% confidence interval up to ±{half_width:.0f} points wide, so smaller differences "
            "are noise: score more prompts, or several samples per prompt "
            "(`dinado generate --do-sample true --num-return-sequences N`).",
        ]
    lines += [
        "",
        "## Examples",
        "",
        "| prompt | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    clean = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    for ex in examples:
        lines.append("| " + " | ".join(clean(ex.get(c, "")) for c in ["prompt", *columns]) + " |")
    return "\n".join(lines) + "\n"
