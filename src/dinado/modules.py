"""The guide's own networks: a small transformer over base hidden states, and zero-initialised heads."""

from __future__ import annotations

import inspect

import torch
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
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(base_hidden_size, dim)
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
        self.token_head = nn.Linear(dim, vocab_size)
        nn.init.zeros_(self.token_head.weight)
        nn.init.zeros_(self.token_head.bias)
        self.norm_head = NormHead(dim) if with_norm else None

    def trunk(
        self,
        base_hidden: torch.Tensor,  # [B, L_new, H]
        attention_mask: torch.Tensor,  # [B, L_past + L_new]
        position_ids: torch.Tensor,  # [B, L_new]
        past_key_values: Cache | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, Cache | None]:
        """The stack's last hidden states [B, L_new, dim] (and its cache): what both heads read."""
        new_mask = attention_mask[:, -base_hidden.shape[1] :, None].to(base_hidden.dtype)
        # Padded positions may hold anything (even NaN); zero them so masked attention cannot spread them.
        x = self.proj(torch.where(new_mask > 0, base_hidden, torch.zeros_like(base_hidden)))
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
    ) -> tuple[torch.Tensor, torch.Tensor | None, Cache | None]:
        h, cache = self.trunk(base_hidden, attention_mask, position_ids, past_key_values, use_cache)
        norm = self.norm_head(h) if self.norm_head is not None else None
        return self.token_head(h), norm, cache
