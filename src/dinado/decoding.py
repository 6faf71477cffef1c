"""Guided decoding: a transformers LogitsProcessor that adds the guide's term to the base's scores.

The processor never re-runs the base model. A forward hook on the base body hands it the hidden states
that ``generate()`` just computed; the guide's own module advances its own KV cache by one step per token,
and follows beam search by matching each running sequence to the one it extends.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from .guide import Guide, check_candidates
from .hf import HiddenCapture, base_body, check_length, eval_mode, position_ids_from_mask
from .parameterizations import candidate_set

# generate() arguments that turn on assisted decoding (a draft model, prompt lookup or early exit)
ASSISTED_DECODING = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


class GuideLogitsProcessor(LogitsProcessor):
    """Turns base scores into log q_theta = log_softmax(log p + alpha * guidance).

    Scores may be logits (greedy, sampling) or log-probabilities (beam search): both are renormalised.
    Use inside ``with processor:`` (which installs the hidden-state hook), or through :func:`generate`.
    ``attention_mask`` is the mask of the prompts given to ``generate()``; for an encoder-decoder base that
    is the encoder's, of which only the batch size is used (the decoder starts from its start token).
    ``use_cache=False`` re-runs the guide's module over the whole prefix at each step (a reference path).
    ``candidates=k`` guides only p's top-k tokens and the tokens already in the sequence at each step; every other
    token keeps a zero direction (:meth:`Parameterization.candidate_log_q`): it decodes q_K, not q_theta,
    for a head that costs k + L rows instead of V; ``guide.next_token_logprobs(..., candidates=k)`` is the same
    distribution.
    """

    def __init__(
        self,
        guide: Guide,
        attention_mask: torch.Tensor | None = None,
        alpha: float = 1.0,
        use_cache: bool = True,
        candidates: int | None = None,
    ) -> None:
        if guide.module is None and alpha != 1.0:
            raise ValueError(
                "alpha != 1 is not available for dinado-merge: its adapted model is q_theta itself, and "
                "another strength would need the base distribution at every step; use alpha=1, or set a "
                "DiNADO-Merge guide's strength in weight space: Guide.merge(adapter_scale=S) (CLI: `dinado merge "
                "--adapter-scale S`, then decode with the merged model as the base)"
            )
        check_candidates(guide, candidates)
        self.guide = guide
        self.candidates = candidates
        self.alpha = float(alpha)
        self.use_cache = use_cache
        if guide.encoder_decoder and attention_mask is not None:
            # the mask generate() gets is the encoder's; the decoder runs from one start token per row
            attention_mask = attention_mask.new_ones((attention_mask.shape[0], 1))
        self.initial_mask = attention_mask
        self._capture: HiddenCapture | None = None
        self._handle = None
        self.reset()

    def reset(self) -> None:
        """Forget the state of the previous generate() call."""
        self._prev_ids: torch.Tensor | None = None
        self._cache = None
        self._hidden: torch.Tensor | None = None  # all base hidden states so far (use_cache=False)
        self._memory: dict[str, torch.Tensor] = {}  # the module's pointer keys of past positions (use_cache)

    def __enter__(self) -> GuideLogitsProcessor:
        self.reset()
        if self.guide.module is not None:
            self._capture = HiddenCapture()
            self._handle = base_body(self.guide.base).register_forward_hook(self._capture)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = self._capture = None
        self.reset()

    def _full_mask(self, rows: int, length: int, device: torch.device) -> torch.Tensor:
        """The attention mask of the running sequences: the prompt's (expanded per beam) then ones."""
        if self.initial_mask is None:
            return torch.ones((rows, length), dtype=torch.long, device=device)
        prompt = self.initial_mask.to(device)
        if rows % prompt.shape[0]:
            raise ValueError(
                f"generate() runs {rows} sequences but the attention mask has {prompt.shape[0]} rows"
            )
        prompt = prompt.repeat_interleave(rows // prompt.shape[0], dim=0)
        extra = torch.ones((rows, length - prompt.shape[1]), dtype=prompt.dtype, device=device)
        return torch.cat([prompt, extra], dim=1)

    def _beam_sources(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """For each running row, the previous row it extends (None when nothing moved)."""
        rows = input_ids.shape[0]
        groups = self.initial_mask.shape[0] if self.initial_mask is not None else 1
        k = rows // groups
        if k == 1:  # one sequence per prompt (greedy, sampling): nothing can move, and no host sync is needed
            return None
        prefix = input_ids[:, :-1]
        if torch.equal(prefix, self._prev_ids):
            return None
        cur = prefix.view(groups, k, -1)
        prev = self._prev_ids.view(groups, k, -1)
        match = (cur[:, :, None, :] == prev[:, None, :, :]).all(-1)  # [groups, k(cur), k(prev)]
        if not bool(match.any(-1).all()):
            raise RuntimeError(
                "a running sequence extends none of the previous step's sequences: the processor was "
                "reused across generate() calls without reset(), or the batch layout changed"
            )
        offsets = torch.arange(groups, device=input_ids.device)[:, None] * k
        return (match.int().argmax(-1) + offsets).flatten()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        guide = self.guide
        if guide.module is None:  # dinado-merge: generate() runs the adapted model, whose scores are q_theta
            return F.log_softmax(scores.float(), dim=-1).to(scores.dtype)
        # log q renormalises log p + guidance, so the logits stand in for log p (one pass over V less per step);
        # the top-k of the candidates is the same on either
        logits = scores.float()
        if self._capture is None:
            raise RuntimeError("use the processor inside `with processor:` or call dinado.generate()")
        hidden_new = self._capture.pop()
        rows, length = input_ids.shape
        mask = self._full_mask(rows, length, input_ids.device)
        fresh = self._prev_ids is None or hidden_new.shape[1] == length
        # the base read the whole sequence (prefill, or generate without a cache) or exactly the newest token
        step = self._prev_ids is not None and hidden_new.shape[1] == length - self._prev_ids.shape[1]
        if hidden_new.shape[0] != rows or not (hidden_new.shape[1] == length or step):
            raise RuntimeError(
                f"the base's forward passes since the previous step covered {tuple(hidden_new.shape[:2])} "
                f"(rows, positions) for {rows} sequences of {length} tokens: guided decoding needs the whole "
                "sequence or the newest token per step (speculative/assisted decoding is not supported)"
            )
        if not fresh:
            src = self._beam_sources(input_ids)
            if src is not None:
                if self.use_cache:
                    self._cache.reorder_cache(src)
                    self._memory = {k: v.index_select(0, src) for k, v in self._memory.items()}
                else:
                    self._hidden = self._hidden.index_select(0, src)
        if fresh:
            self._cache, self._hidden, self._memory = None, None, {}
        if not self.use_cache:
            self._hidden = (
                hidden_new if self._hidden is None else torch.cat([self._hidden, hidden_new], dim=1)
            )
            hidden_new = self._hidden
        positions = position_ids_from_mask(mask)[:, -hidden_new.shape[1] :]
        ids = None  # the candidates: p's top-k and the sequence's own tokens (candidate_set)
        if self.candidates is not None:
            ids = candidate_set(logits, self.candidates, input_ids, mask.bool())
        with torch.no_grad():
            direction, _, cache = guide.run_module(
                hidden_new,
                input_ids,
                mask,
                positions,
                past_key_values=self._cache if self.use_cache else None,
                use_cache=self.use_cache,
                memory=self._memory if self.use_cache else None,
                last_only=True,
                candidates=None if ids is None else ids[:, None, :],
            )
        self._cache = cache
        self._prev_ids = input_ids
        if ids is None:
            log_q = guide.parameterization.log_q(logits, direction[:, -1].float(), self.alpha)
        else:
            log_q = guide.parameterization.candidate_log_q(logits, ids, direction[:, -1].float(), self.alpha)
        return log_q.to(scores.dtype)


def generate(
    guide: Guide,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    alpha: float = 1.0,
    logits_processor: LogitsProcessorList | list | None = None,
    candidates: int | None = None,
    **generate_kwargs: Any,
):
    """The base model's ``generate()`` with the guide applied; returns what ``generate()`` returns.

    Greedy, sampling and beam search all work; pass ``top_k=0`` to sample from q_theta itself
    (transformers applies top_k=50 by default when sampling). ``candidates=k``: candidate-restricted guidance
    (see :class:`GuideLogitsProcessor`). For an encoder-decoder base, ``input_ids`` and
    ``attention_mask`` are the source (pad it on the right) and the output starts with the decoder start token.
    """
    refused = sorted(k for k in ASSISTED_DECODING if generate_kwargs.get(k) is not None)
    if refused:
        raise ValueError(
            f"{', '.join(refused)}: assisted (speculative) decoding scores several drafted tokens in one base "
            "pass and then calls the logits processors once per token; dinado's guide reads one step at a time, "
            "so it is not supported: decode without it"
        )
    check_length(guide.base, input_ids.shape[1], generate_kwargs.get("max_new_tokens"))
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)  # no mask given: nothing is padding
    # the processor builds its masks on the ids' device: it must be the base's (a GPU, say)
    device = next(guide.base.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    processor = GuideLogitsProcessor(guide, attention_mask, alpha, candidates=candidates)
    processors = LogitsProcessorList([processor, *(logits_processor or [])])
    with eval_mode(guide), processor:  # every submodule's own mode comes back afterwards
        return guide.base.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_processor=processors,
            **generate_kwargs,
        )
