"""Batched ancestral sampling from a base model or from a guide (as a proposal), labelled by an oracle.

For every token the sampler records log p (the base at temperature 1) and the log-probability under the
distribution actually sampled from (after the guide, temperature and top-p), so that the whole-sequence
importance weight log p(x) - log pi(x) is exact.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import LogitsProcessor, PreTrainedModel, TemperatureLogitsWarper, TopPLogitsWarper

from .data import SampleSet, left_pad, right_pad
from .decoding import generate as guided_generate
from .features import FeatureCache, caches_from_recorded, recording_plan
from .guide import Guide
from .hf import (
    accepts_argument,
    base_fingerprint,
    base_vocab_size,
    capture_hidden,
    capture_layer_input,
    check_length,
    decoder_start_token_id,
    eval_mode,
    is_encoder_decoder,
    position_ids_from_mask,
    tokenizer_fingerprint,
)
from .oracles import call_oracle, describe


class _ChosenTokenRecorder(LogitsProcessor):
    """The last logits processor of a sampling ``generate()``: log-probabilities of the chosen tokens only.

    Its scores are the distribution ``generate()`` samples from (nothing runs after it), so it records log pi. With
    ``raw_from`` (the generating model), a forward hook also records log p: the model's own logits of the step,
    before any processor, at temperature 1. Neither ever holds more than one or two steps of ``[N, V]``: at each
    call the sequences end with the token chosen at the previous step, whose log-probabilities are gathered from
    the kept step, and :meth:`finish` gathers the last one. (Asking ``generate()`` for ``output_scores`` and
    ``output_logits`` instead keeps ``[steps, N, V]`` of each.)
    """

    def __init__(self, raw_from: nn.Module | None = None) -> None:
        self.log_pi: list[torch.Tensor] = []  # [N] per generated token
        self.log_p: list[torch.Tensor] = []
        self._pi: torch.Tensor | None = None  # [N, V] log pi of the current step
        self._p: torch.Tensor | None = None  # [N, V] log p of the current step (set by the hook)
        self._p_previous: torch.Tensor | None = None
        self._raw_from = raw_from
        self._handle = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        # one forward per step, before that step's processors run
        logits = output.logits if hasattr(output, "logits") else output[0]
        self._p_previous, self._p = self._p, F.log_softmax(logits[:, -1].float(), dim=-1)

    def __enter__(self) -> _ChosenTokenRecorder:
        if self._raw_from is not None:
            self._handle = self._raw_from.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._pi = self._p = self._p_previous = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pi is not None:
            chosen = input_ids[:, -1:]
            self.log_pi.append(self._pi.gather(-1, chosen).squeeze(-1))
            if self._raw_from is not None:
                self.log_p.append(self._p_previous.gather(-1, chosen).squeeze(-1))
        self._pi = F.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, gen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log pi, log p or None), each [N, T], for the ``T`` generated tokens ``gen`` [N, T]."""
        steps = gen.shape[1]
        if len(self.log_pi) < steps:  # the last chosen token: no call came after it
            last = gen[:, steps - 1 : steps]
            self.log_pi.append(self._pi.gather(-1, last).squeeze(-1))
            if self._raw_from is not None:
                self.log_p.append(self._p.gather(-1, last).squeeze(-1))
        # steps generate() ran and then undid (a deferred stop check) are cut off
        log_pi = torch.stack(self.log_pi[:steps], dim=1)
        log_p = torch.stack(self.log_p[:steps], dim=1) if self._raw_from is not None else None
        return log_pi, log_p


class InverseCdfSampler(LogitsProcessor):
    """Sampling for a greedy ``generate()``: as its last logits processor it draws the next token from
    ``softmax(scores)`` (inverse-CDF lookup in float64) and returns scores that leave only that token, so greedy
    search takes it. ``generate(..., do_sample=False, logits_processor=LogitsProcessorList([InverseCdfSampler()]))``
    samples as ``do_sample=True, top_k=0, temperature=1.0`` does (processors before it shape the scores), but
    ``torch.multinomial`` costs ~0.1 s per step for 100 rows of a 49k vocabulary on CPU and this ~0.01 s (~15% of
    SmolLM2's decoding time). Draws from torch's global generator (``torch.manual_seed``). dinado.sample and the
    demo sample with it."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cumulative = F.softmax(scores.double(), dim=-1).cumsum_(-1)
        point = (
            torch.rand((scores.shape[0], 1), dtype=torch.float64, device=scores.device) * cumulative[:, -1:]
        )
        # the first token whose cumulative probability passes the point: a token of probability 0 never is
        chosen = torch.searchsorted(cumulative, point, right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, chosen, 0.0)


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


def label_samples(oracle: Callable, prompts: list, completions: list, batch_size: int) -> list[float]:
    """``oracle`` on (prompt ids, completion ids) pairs, ``batch_size`` at a time: one label per pair."""
    labels: list[float] = []
    for start in range(0, len(prompts), batch_size):
        end = start + batch_size
        labels.extend(call_oracle(oracle, prompts[start:end], completions[start:end]))
    return labels


def relabel(samples: SampleSet, oracle: Callable, batch_size: int = 64) -> SampleSet:
    """The same samples labelled by another ``oracle`` (called as :func:`sample` calls it, on token ids), e.g.
    soft labels for a set drawn once: nothing is sampled again. The metadata records the new oracle."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    labelled = samples.with_labels(label_samples(oracle, samples.prompts, samples.completions, batch_size))
    labelled.metadata["oracle"] = describe(oracle)
    return labelled


def _generated_cache(output: Any) -> Any:
    # transformers 5.x names the KV cache of generate()'s output ``cache`` (4.x: ``past_key_values``)
    return output.cache if hasattr(output, "cache") else output.past_key_values


def _record_states(
    model, seen: dict, out: MutableMapping, ids, mask, gen, past, prompt_lengths, lengths
) -> None:
    """Append to ``out[key]`` each row's states ``[prompt + completion, H]`` from the forward passes of one
    ``generate()`` call (``seen[key]``: the left-padded prefill, then one position per step), after one more step
    on the last generated tokens (generation computes no states for them) unless generate already ran it."""
    width, steps = ids.shape[1], gen.shape[1]
    if any(len(parts) <= steps for parts in seen.values()):
        full_mask = torch.cat([mask, torch.ones_like(gen)], 1)
        model(
            input_ids=gen[:, -1:],
            attention_mask=full_mask,
            position_ids=full_mask.sum(1, keepdim=True) - 1,  # generate()'s positions for left-padded rows
            use_cache=True,
            **{_cache_argument(model): past},
        )
    for key, parts in seen.items():
        parts = parts[: steps + 1]  # a step generate() ran and then undid holds the last token too
        shapes = [tuple(p.shape[:2]) for p in parts]
        expected = [(len(gen), width)] + [(len(gen), 1)] * steps
        if shapes != expected:
            raise RuntimeError(
                f"record_states expected a prefill of {width} positions and one pass per generated token, "
                f"got passes of shapes {shapes}: this model's generate() runs its forward passes otherwise"
            )
        states = torch.cat(parts, dim=1)
        for r, (p, n) in enumerate(zip(prompt_lengths, lengths.tolist(), strict=True)):
            out[key].append(states[r, width - p : width + n].to("cpu").clone())
        seen[key].clear()


def _cache_argument(model) -> str:
    # transformers 5.x names the KV cache argument ``cache`` (earlier: ``past_key_values``)
    return "cache" if accepts_argument(model, "cache") else "past_key_values"


def _shared_prefill(
    model, chunk: list, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[Any, torch.Tensor] | None:
    """One prefill per distinct prompt of a left-padded ``chunk`` whose repeats of a prompt sit side by side (as
    ``sample`` lays out its rows): the KV cache of every row's prompt but its last token, computed on the distinct
    prompts and gathered to all rows, and the row -> distinct prompt index; None when no prompt repeats (or a
    prompt has a single token). ``generate`` then runs the last prompt token of every row as its first step. The
    prefill is most of the cost of sampling a few completions of short answers (on SmolLM2's chat prompts, ~40%
    of it at 4 samples per prompt)."""
    starts = [r == 0 or chunk[r] != chunk[r - 1] for r in range(len(chunk))]
    if all(starts) or min(len(row) for row in chunk) < 2:
        return None
    firsts = [r for r, start in enumerate(starts) if start]
    index = torch.tensor(starts, device=ids.device).cumsum(0) - 1  # row -> its distinct prompt
    unique_ids, unique_mask = ids[firsts, :-1], mask[firsts, :-1]
    kwargs = dict(
        input_ids=unique_ids,
        attention_mask=unique_mask,
        position_ids=position_ids_from_mask(unique_mask),
        use_cache=True,
    )
    if accepts_argument(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1  # the logits of the prefill are never read
    cache = _generated_cache(model(**kwargs))
    if not hasattr(cache, "batch_select_indices"):  # a model without a transformers Cache: a prefill per row
        return None
    cache.batch_select_indices(index)
    return cache, index


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
    record_states: MutableMapping[int | None, list[torch.Tensor]] | None = None,
    share_prefill: bool = True,
) -> SampleSet:
    """Draw ``num_samples`` completions per prompt from ``source`` and label them with ``oracle``.

    ``source`` is the base model (samples from p) or a :class:`Guide` (samples from q_theta, a proposal).
    The oracle is called as ``oracle(prompts, completions)`` on token-id lists; wrap a text oracle in
    :class:`dinado.oracles.TextOracle`. Log importance weights are stored unless the samples come from p
    exactly (the base at temperature 1 without top-p). The sampling settings of the model's generation config
    (temperature, top-k, top-p, min-p, typical-p...) are not used, only ``temperature`` and ``top_p`` given here
    (no top-k); logits processors it sets (e.g. a repetition penalty) stay on and are part of the recorded
    proposal. Tokens are drawn by inverse-CDF lookup (``InverseCdfSampler``), not ``torch.multinomial``.
    Only the chosen tokens' log-probabilities are kept (never ``[steps, N, V]`` score tensors).

    Encoder-decoder bases (Marian, T5, BART): prompts are the encoder inputs (sources, ending as the model
    expects, e.g. with EOS), completions the decoder tokens after the decoder start token, which the sample
    set's metadata records as ``decoder_start_token_id``.

    ``proposal``: another causal LM with the same tokenizer to draw from instead (e.g. a model fine-tuned on
    references, which satisfies the oracle more often); ``source`` must then be the base model, and log p is
    read from it by teacher forcing, so the stored weights are ``log p(x|c) - log proposal(x|c)``.

    ``record_states``: keep hidden states the base computes while it generates, so that training need not run it
    over the samples again (:func:`sample_with_features` builds feature caches from them). A dict
    whose keys name the states (``None``: the body's last hidden states; ``i``: what decoder layer ``i`` reads);
    each key's list receives one ``[prompt + completion tokens, H]`` tensor per sample, in the order of the
    returned set. Only when sampling from a decoder-only base itself (no guide, no proposal); the states of a
    completion's last token, which generation never feeds back, come from one more cached step.

    ``share_prefill``: when sampling from a decoder-only base itself, each distinct prompt of a batch is run once
    and its KV cache shared by its ``num_samples`` rows (the same distribution; the numbers equal those of a
    prefill per row up to float rounding). False runs the prompt of every row.
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
    if record_states is not None and (guide is not None or proposal is not None or decoder_start is not None):
        raise ValueError(
            "record_states keeps the base's own hidden states: sample from a decoder-only base itself (no Guide "
            "as source, no proposal)"
        )
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    completions: list[list[int]] = []
    token_log_p: list[list[float]] = []
    token_log_pi: list[list[float]] = []
    # dropout off for every model read (a model built from a config starts in training mode)
    # the bar is closed on errors and Ctrl-C too, so that nothing redraws it after the CLI's last line
    with ExitStack() as stack:
        stack.enter_context(eval_mode(model, proposal, guide))
        bar = stack.enter_context(tqdm(total=len(rows), desc="sample", disable=not progress))
        seen = {  # each recorded key's per-forward-pass states
            key: stack.enter_context(capture_hidden(model)).parts
            if key is None
            else stack.enter_context(capture_layer_input(model, key))
            for key in record_states or {}
        }
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask = (right_pad if decoder_start is not None else left_pad)(chunk, pad)
            ids, mask = ids.to(device), mask.to(device)
            # temperature and top-p run as processors before the recorder (in generate()'s own order: the
            # config's processors, the guide, temperature, top-p), so that the recorder sees the final scores
            warpers: list[LogitsProcessor] = []
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
            generator_model = proposal if proposal is not None else model
            # log p from the generating model's own logits: the base itself, or a module guide's base
            raw_from = (
                generator_model if proposal is None and (guide is None or guide.module is not None) else None
            )
            recorder = _ChosenTokenRecorder(raw_from)
            kwargs = dict(
                attention_mask=mask,
                do_sample=False,  # greedy over InverseCdfSampler's choice: sampling, without torch.multinomial
                num_beams=1,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                logits_processor=[*warpers, recorder, InverseCdfSampler()],
            )
            if seen:
                kwargs["return_dict_in_generate"] = True  # its cache serves the last token's extra step
                for parts in seen.values():
                    parts.clear()
            shared = None
            if share_prefill and guide is None and proposal is None and decoder_start is None:
                shared = _shared_prefill(model, chunk, ids, mask)
                if shared is not None:
                    kwargs[_cache_argument(model)] = shared[0]
            with recorder:
                if guide is not None:
                    sequences = guided_generate(guide, ids, **kwargs)
                else:
                    sequences = generator_model.generate(ids, **kwargs)
                if seen:
                    past, sequences = _generated_cache(sequences), sequences.sequences
                # [N, T], after the prompt / decoder start
                gen = sequences[:, (1 if decoder_start is not None else ids.shape[1]) :]
                log_pi, log_p = recorder.finish(gen)
            steps = gen.shape[1]
            is_eos = gen == eos
            lengths = torch.where(
                is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full_like(gen[:, 0], steps)
            )
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
            if seen:
                if shared is not None:
                    # the prefill's states, gathered to every row, then the last prompt token's
                    for parts in seen.values():
                        parts[:2] = [torch.cat([parts[0][shared[1]], parts[1]], dim=1)]
                _record_states(
                    model, seen, record_states, ids, mask, gen, past, [len(c) for c in chunk], lengths
                )
            for r in range(len(chunk)):
                n = int(lengths[r])
                completions.append(gen[r, :n].tolist())
                token_log_p.append(log_p[r, :n].tolist())
                token_log_pi.append(log_pi[r, :n].tolist())
            bar.update(len(chunk))
    labels = label_samples(oracle, rows, completions, batch_size)
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


def sample_with_features(
    model: PreTrainedModel,
    guides: Sequence[Guide],
    prompts: Sequence[Sequence[int]],
    num_samples: int,
    oracle: Callable,
    max_new_tokens: int,
    dtype: torch.dtype | None = None,
    **sample_kwargs: Any,
) -> tuple[SampleSet, list[FeatureCache]]:
    """:func:`sample` from the base ``model`` and, from the very forward passes that generate the samples, one
    :class:`~dinado.features.FeatureCache` per guide (as :func:`dinado.precompute_shared_features` builds them
    with a second pass of the base over the finished samples, which this saves: about a third of sampling's
    cost on SmolLM2).

    ``guides`` must have been created on ``model`` (decoder-only; module variants and DiNADO-Merge); ``dtype`` is
    the caches' storage type (default: the base's). The states come from cached incremental decoding, so they
    equal a full pass's up to float rounding; the first two samples are checked against a full pass (and the
    guides' loss paths against the base's logits, as ``precompute_features`` checks them).
    ``sample_kwargs`` go to :func:`sample` (``temperature``, ``batch_size``, ``seed``, ``tokenizer``...).
    """
    guides, storage, states = recording_plan(model, guides, dtype)
    samples = sample(
        model, prompts, num_samples, oracle, max_new_tokens, record_states=states, **sample_kwargs
    )
    return samples, caches_from_recorded(model, guides, samples, states, storage)
