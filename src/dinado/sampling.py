"""Batched ancestral sampling from a base model or from a guide (as a proposal), labelled by an oracle.

For every token the sampler records log p (the base at temperature 1) and the log-probability under the
distribution actually sampled from (after the guide, temperature and top-p), so that the whole-sequence
importance weight log p(x) - log pi(x) is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .decoding import check_length
from .decoding import generate as guided_generate
from .guide import (
    Guide,
    base_fingerprint,
    base_vocab_size,
    decoder_start_token_id,
    eval_mode,
    is_encoder_decoder,
    position_ids_from_mask,
)
from .io import tokenizer_fingerprint
from .oracles import call_oracle, describe
from .samples import SampleSet, left_pad, right_pad


def _gather(step_scores: Sequence[torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities [N, T] of ``tokens`` under the per-step scores (renormalised)."""
    out = [
        F.log_softmax(s.float(), dim=-1).gather(-1, tokens[:, t, None]).squeeze(-1)
        for t, s in enumerate(step_scores)
    ]
    return torch.stack(out, dim=1)


def _proposal_name(guide: Guide | None, proposal: PreTrainedModel | None) -> str:
    if guide is not None:
        return guide.config.variant
    if proposal is not None:
        return "model:" + (getattr(proposal.config, "_name_or_path", "") or "unnamed")
    return "base"


def _base_logits(model, input_ids, attention_mask, encoder_input_ids=None, encoder_attention_mask=None):
    if encoder_input_ids is not None:
        return model(
            input_ids=encoder_input_ids,
            attention_mask=encoder_attention_mask,
            decoder_input_ids=input_ids,
            decoder_attention_mask=attention_mask,
        ).logits
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
    ).logits


def _teacher_forced(log_probs: Callable, ids, mask, gen, start: int | None) -> torch.Tensor:
    """log-probabilities [N, T] of the generated tokens ``gen`` after the prompts ``ids``, in one pass.

    ``log_probs(input_ids, attention_mask[, encoder_input_ids, encoder_attention_mask])`` -> [N, L, V].
    """
    if start is not None:  # encoder-decoder: the decoder reads [start | gen], the encoder the prompt
        dec = torch.cat([gen.new_full((gen.shape[0], 1), start), gen], 1)
        lp = log_probs(dec, torch.ones_like(dec), ids, mask)[:, :-1]
    else:
        full = torch.cat([ids, gen], 1)
        full_mask = torch.cat([mask, torch.ones_like(gen)], 1)
        lp = log_probs(full, full_mask)[:, ids.shape[1] - 1 : -1]
    return lp.gather(-1, gen[..., None]).squeeze(-1)


@torch.no_grad()
def sample(
    source: PreTrainedModel | Guide,
    prompts: Sequence[Sequence[int]],
    num_samples: int,
    oracle: Callable,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    tokenizer: Any = None,
    progress: bool = False,
    proposal: PreTrainedModel | None = None,
) -> SampleSet:
    """Draw ``num_samples`` completions per prompt from ``source`` and label them with ``oracle``.

    ``source`` is the base model (samples from p) or a :class:`Guide` (samples from q_theta, a proposal).
    The oracle is called as ``oracle(prompts, completions)`` on token-id lists; wrap a text oracle in
    :class:`dinado.oracles.TextOracle`. Log importance weights are stored unless the samples come from p
    exactly (the base at temperature 1 without top-p).

    Encoder-decoder bases (Marian, T5, BART): prompts are the encoder inputs (sources, ending as the model
    expects, e.g. with EOS), completions the decoder tokens after the decoder start token, which the sample
    set's metadata records as ``decoder_start_token_id``.

    ``proposal``: another causal LM with the same tokenizer to draw from instead (e.g. a model fine-tuned on
    references, which satisfies the oracle more often); ``source`` must then be the base model, and log p is
    read from it by teacher forcing, so the stored weights are ``log p(x|c) - log proposal(x|c)``.
    """
    if num_samples < 1 or max_new_tokens < 1 or batch_size < 1:
        raise ValueError("num_samples, max_new_tokens and batch_size must be at least 1")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    guide = source if isinstance(source, Guide) else None
    model = guide.base if guide is not None else source
    if proposal is not None:
        if guide is not None:
            raise ValueError("give either a Guide as source or proposal=, not both")
        if base_vocab_size(proposal) != base_vocab_size(model):
            raise ValueError(
                f"the proposal's vocabulary ({base_vocab_size(proposal)}) differs from the base's "
                f"({base_vocab_size(model)}): it must share the base's tokenizer"
            )
    cfg = model.generation_config
    eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        raise ValueError("the model has no eos_token_id: pass eos_token_id=")
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (cfg.pad_token_id if cfg.pad_token_id is not None else eos)
    )
    rows = [list(p) for p in prompts for _ in range(num_samples)]
    if any(len(p) == 0 for p in rows):
        raise ValueError("every prompt needs at least one token (GPT-2 style models: start with BOS/EOS)")
    vocab = base_vocab_size(model)
    # encoder-decoder bases: prompts are encoder inputs (padded on the right), completions decoder tokens
    decoder_start = decoder_start_token_id(model) if is_encoder_decoder(model) else None
    check_length(model, max(len(p) for p in rows), max_new_tokens)
    exact_p = guide is None and proposal is None and temperature == 1.0 and top_p == 1.0
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    completions: list[list[int]] = []
    token_log_p: list[list[float]] = []
    token_log_pi: list[list[float]] = []
    # dropout off for every model read (a model built from a config starts in training mode)
    # the bar is closed on errors and Ctrl-C too, so that nothing redraws it after the CLI's last line
    with eval_mode(model, proposal, guide), tqdm(total=len(rows), desc="sample", disable=not progress) as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask = (right_pad if decoder_start is not None else left_pad)(chunk, pad)
            ids, mask = ids.to(device), mask.to(device)
            kwargs = dict(
                attention_mask=mask,
                do_sample=True,
                top_k=0,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                return_dict_in_generate=True,
                output_scores=True,
                output_logits=True,
            )
            if guide is not None:
                out = guided_generate(guide, ids, **kwargs)
            else:
                out = (proposal if proposal is not None else model).generate(ids, **kwargs)
            steps = len(out.scores)
            # [N, T], after the prompt / decoder start
            gen = out.sequences[:, out.sequences.shape[1] - steps :]
            is_eos = gen == eos
            lengths = torch.where(
                is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(gen[:, 0], steps)
            )
            log_pi = _gather(out.scores, gen)
            if guide is not None and guide.module is None:
                # dinado-merge generates with the adapted model: read p from the frozen base by teacher
                # forcing
                log_p = _teacher_forced(lambda *a: guide(*a).log_p, ids, mask, gen, decoder_start)
            elif proposal is not None:
                log_p = _teacher_forced(
                    lambda *a: F.log_softmax(_base_logits(model, *a).float(), dim=-1),
                    ids,
                    mask,
                    gen,
                    decoder_start,
                )
            else:
                log_p = _gather(out.logits, gen)
            for r in range(len(chunk)):
                n = int(lengths[r])
                completions.append(gen[r, :n].tolist())
                token_log_p.append(log_p[r, :n].tolist())
                token_log_pi.append(log_pi[r, :n].tolist())
            bar.update(len(chunk))
    labels: list[float] = []
    for start in range(0, len(rows), batch_size):
        labels.extend(
            call_oracle(oracle, rows[start : start + batch_size], completions[start : start + batch_size])
        )
    log_weights = [sum(a) - sum(b) for a, b in zip(token_log_p, token_log_pi, strict=True)]
    if exact_p and max(abs(w) for w in log_weights) < 1e-4:
        # samples from p itself; a processor from the model's generation_config (e.g. a repetition penalty)
        # shows up as non-zero weights, which are then kept
        log_weights = None
    metadata = {
        "base_model": getattr(model.config, "_name_or_path", None) or None,
        "vocab_size": vocab,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "base_fingerprint": (guide.config.base_fingerprint if guide is not None else None)
        or base_fingerprint(model),
        "oracle": describe(oracle),
        "sampling": {
            "proposal": _proposal_name(guide, proposal),
            "temperature": temperature,
            "top_p": top_p,
            "max_new_tokens": max_new_tokens,
            "num_samples_per_prompt": num_samples,
            "seed": seed,
            "eos_token_id": eos,
        },
    }
    if decoder_start is not None:
        metadata["decoder_start_token_id"] = decoder_start
    return SampleSet.from_token_ids(
        rows, completions, labels, log_weights, metadata, token_log_p, token_log_pi
    )
