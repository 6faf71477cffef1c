"""The guide's own networks: a small transformer over base hidden states, and zero-initialised heads."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.cache_utils import Cache

# transformers 5.x renamed a model's KV-cache argument and output field from ``past_key_values`` to ``cache``;
# the old name raises a FutureWarning on every call and is to be removed in 5.40. Use this version's name.
_CACHE = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def default_num_heads(dim: int) -> int:
    for heads in (16, 12, 8, 4, 2, 1):
        if dim % heads == 0 and dim // heads >= 16:
            return heads
    return 1


class NormHead(nn.Module):
    """MLP giving DiNADO's norm logit n per position; the last layer starts at zero (N = 0.5)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L]
        return self.net(hidden).squeeze(-1)


class PointerScores(nn.Module):
    """Copy scores (``GuideConfig.pointer``): at position t, a score for every earlier position j <= t, added to
    the direction of the token x_j that stands there (pointer-generator networks, See et al. 2017). This is how
    a guide can follow "use the words the prompt names" for words it never saw in training: the score depends on
    what the module reads at t and at j, not on the token's identity. The query starts at zero (scores 0)."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, width)
        self.key = nn.Linear(dim, width)
        nn.init.zeros_(self.query.weight)
        nn.init.zeros_(self.query.bias)
        self.scale = width**-0.5

    def forward(
        self,
        h: torch.Tensor,  # [B, L_new, dim] the states of the newest positions
        keys: torch.Tensor,  # [B, L_all, width] the keys of every position so far (the newest last)
        attention_mask: torch.Tensor,  # [B, L_all]
    ) -> torch.Tensor:  # [B, L_new, L_all], 0 where j > t or j is padding
        scores = self.query(h) @ keys.transpose(1, 2) * self.scale
        new, total = h.shape[1], keys.shape[1]
        causal = torch.ones(new, total, dtype=torch.bool, device=h.device).tril(diagonal=total - new)
        allowed = causal[None] & (attention_mask[:, None, :] > 0)
        return torch.where(allowed, scores, torch.zeros_like(scores))


def add_pointer_scores(
    direction: torch.Tensor, scores: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """direction [B, L_new, V] plus each score [B, L_new, L_all] at the token [B, L_all] of its position, in place
    (``direction`` is a fresh head output: its linear map's backward pass does not read it)."""
    index = token_ids[:, None, :].expand(-1, scores.shape[1], -1)
    return direction.scatter_add_(-1, index, scores.to(direction.dtype))


class GuideModule(nn.Module):
    """A few GPT-2 blocks reading the base's last hidden states (a linear projection in).

    Reusing transformers' GPT2Model gives attention, positions and a KV cache that supports
    beam reordering, so guided decoding runs one incremental step per token.
    """

    def __init__(
        self,
        base_hidden_size: int,
        vocab_size: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        max_positions: int,
        with_norm: bool,
        head: str = "full",
        token_size: int | None = None,
        pointer: bool = False,
        head_rank: int | None = None,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(base_hidden_size, dim)
        # read_tokens: the base's input embedding of each token, projected and added to the hidden state's
        self.token_proj = nn.Linear(token_size, dim, bias=False) if token_size else None
        config = GPT2Config(
            vocab_size=1,  # unused: the stack reads projected hidden states, never token ids
            n_embd=dim,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_positions,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        )
        self.body = GPT2Model(config)
        # The direction is head_input(h) @ W^T + b with W the [V, r] matrix of head_weights(). Whichever factor is
        # zero-initialised, q_theta = p at the start.
        self.head_down = self.head_up = None
        if head == "full" and head_rank is None:
            self.token_head = nn.Linear(dim, vocab_size)  # W: its own [V, dim]
        elif head == "full":  # W: its own [V, r], read through a random dim -> r projection
            self.head_down = nn.Linear(dim, head_rank, bias=False)
            self.token_head = nn.Linear(head_rank, vocab_size)
        elif head == "tied" and head_rank is None:  # a vector in the base's hidden space, read by E [V, H]
            self.token_head = nn.Linear(dim, base_hidden_size, bias=False)
        elif head == "tied":  # W = E @ U, U a random [H, r] map: r coordinates in the base's hidden space
            self.token_head = nn.Linear(dim, head_rank, bias=False)
            self.head_up = nn.Linear(head_rank, base_hidden_size, bias=False)
        else:
            raise ValueError(f"unknown head {head!r}: 'full' or 'tied'")
        self.head = head
        nn.init.zeros_(self.token_head.weight)
        if self.token_head.bias is not None:
            nn.init.zeros_(self.token_head.bias)
        self._frozen_weights: tuple[tuple, torch.Tensor] | None = (
            None  # E @ U while nothing changes (decoding)
        )
        self.norm_head = NormHead(dim) if with_norm else None
        self.pointer = PointerScores(dim, min(dim, 64)) if pointer else None

    def trunk(
        self,
        base_hidden: torch.Tensor,  # [B, L_new, H]
        attention_mask: torch.Tensor,  # [B, L_past + L_new]
        position_ids: torch.Tensor,  # [B, L_new]
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        token_embeds: torch.Tensor | None = None,  # [B, L_new, E]: the base's input embeddings (read_tokens)
    ) -> tuple[torch.Tensor, Cache | None]:
        """The stack's last hidden states [B, L_new, dim] (and its cache): what both heads read."""
        new_mask = attention_mask[:, -base_hidden.shape[1] :, None].to(base_hidden.dtype)
        # Padded positions may hold anything (even NaN); zero them so masked attention cannot spread them.
        x = self.proj(torch.where(new_mask > 0, base_hidden, torch.zeros_like(base_hidden)))
        if self.token_proj is not None:
            if token_embeds is None:
                raise ValueError("this guide module reads token embeddings (read_tokens): pass token_embeds")
            x = x + self.token_proj(torch.where(new_mask > 0, token_embeds, torch.zeros_like(token_embeds)))
        out = self.body(
            inputs_embeds=x,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **{_CACHE: past_key_values},
        )
        return out.last_hidden_state, getattr(out, _CACHE) if use_cache else None

    def forward(
        self,
        base_hidden: torch.Tensor,  # [B, L_new, H]
        attention_mask: torch.Tensor,  # [B, L_past + L_new]
        position_ids: torch.Tensor,  # [B, L_new]
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        token_embeds: torch.Tensor | None = None,
        output_embeddings: torch.Tensor | None = None,  # [V, H]: the base's, for the tied head
        token_ids: torch.Tensor | None = None,  # [B, L_past + L_new]: every token so far (pointer)
        memory: dict[str, torch.Tensor] | None = None,  # the pointer keys of past positions, updated in place
        last_only: bool = False,
        candidates: torch.Tensor | None = None,  # [B, L_new (1 with last_only), k] token ids
    ) -> tuple[torch.Tensor, torch.Tensor | None, Cache | None]:
        """(direction [B, L_new, V], norm logit [B, L_new] or None, cache).

        With a pointer, ``memory["pointer_keys"]`` holds the keys of the positions before these (decoding with a
        cache: the caller keeps the dict between steps and reorders it with the beams); None: there are none.
        ``last_only``: the heads read only the newest position (L_new = 1 in the outputs): decoding needs no
        more, and a prompt's prefill then costs one [*, V] product instead of one per prompt token.
        ``candidates``: the direction at those tokens only, [B, L_new, k] (the head costs k rows, not V).
        """
        h, cache = self.trunk(
            base_hidden, attention_mask, position_ids, past_key_values, use_cache, token_embeds
        )
        keys = None
        if self.pointer is not None:
            if token_ids is None:
                raise ValueError("this guide module has a pointer: pass token_ids")
            keys = self.pointer.key(h)  # every new position is a pointer target, even with last_only
            if memory is not None:
                if "pointer_keys" in memory:
                    keys = torch.cat([memory["pointer_keys"], keys], dim=1)
                memory["pointer_keys"] = keys
        if last_only:
            h = h[:, -1:]
        norm = self.norm_head(h) if self.norm_head is not None else None
        weight, bias = self.head_weights(output_embeddings)
        if candidates is not None:
            return (
                self._candidate_direction(h, weight, bias, candidates, keys, attention_mask, token_ids),
                norm,
                cache,
            )
        direction = F.linear(self.head_input(h), weight, bias)
        if keys is not None:
            direction = add_pointer_scores(direction, self.pointer(h, keys, attention_mask), token_ids)
        return direction, norm, cache

    def _candidate_direction(
        self,
        h: torch.Tensor,  # [B, L, dim]
        weight: torch.Tensor,  # [V, r]
        bias: torch.Tensor | None,  # [V]
        candidates: torch.Tensor,  # [B, L, k]
        keys: torch.Tensor | None,  # [B, L_all, width]
        attention_mask: torch.Tensor,  # [B, L_all]
        token_ids: torch.Tensor | None,  # [B, L_all]
    ) -> torch.Tensor:  # [B, L, k]: what forward() gives at those tokens
        direction = (weight[candidates] @ self.head_input(h)[..., None]).squeeze(-1)
        if bias is not None:
            direction = direction + bias[candidates]
        if keys is not None:  # each candidate collects the scores of the positions that hold it
            scores = self.pointer(h, keys, attention_mask)  # [B, L, L_all]
            holds = token_ids[:, None, None, :] == candidates[..., None]  # [B, L, k, L_all]
            direction = direction + (holds * scores[:, :, None, :].to(direction.dtype)).sum(-1)
        return direction

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        """What the [V, *] head matrix multiplies: the stack's state (full head), its low-rank projection
        (``head_rank``), or its image in the base's hidden space or its r coordinates there (tied head)."""
        if self.head_down is not None:
            return self.head_down(h)
        return h if self.head == "full" else self.token_head(h)

    def head_weights(
        self, output_embeddings: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The [V, *] matrix and [V] bias (or None) of the direction: direction = head_input(h) @ W^T + b."""
        if self.head == "full":
            return self.token_head.weight, self.token_head.bias
        if output_embeddings is None:
            raise ValueError("a tied guide head needs the base's output embeddings")
        if self.head_up is None:
            return output_embeddings, None
        up = self.head_up.weight  # [H, r]
        if torch.is_grad_enabled() and up.requires_grad:
            return output_embeddings @ up.to(output_embeddings.dtype), None
        # decoding: E @ U costs V x H x r, so it is computed once and kept while neither factor changes
        key = (output_embeddings.data_ptr(), output_embeddings._version, up.data_ptr(), up._version)
        key += (output_embeddings.dtype, tuple(output_embeddings.shape))
        if self._frozen_weights is None or self._frozen_weights[0] != key:
            with torch.no_grad():
                self._frozen_weights = (key, output_embeddings @ up.to(output_embeddings.dtype))
        return self._frozen_weights[1], None
