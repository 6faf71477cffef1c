"""Guide: a frozen base model plus the learned value module of one NADO/DiNADO variant."""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from ._utils import atomic_file, atomic_write_text
from .config import GuideConfig
from .hf import (
    accepts_argument,
    base_fingerprint,
    base_hidden_size,
    base_vocab_size,
    capture_hidden,
    decoder_start_token_id,
    is_encoder_decoder,
    is_quantized,
    lora_config,
    position_ids_from_mask,
    shared_weight_copy,
    tokenizer_fingerprint,
    unwrap_peft,
    wrap_peft,
)
from .modules import GuideModule, NormHead, default_num_heads
from .numerics import LOG_FLOOR
from .parameterizations import Parameterization, candidate_set, parameterization_for

CONFIG_NAME = "dinado_config.json"
WEIGHTS_NAME = "guide.safetensors"


@dataclass
class GuideOutputs:
    """Raw outputs at every position t (having read x_<=t); see parameterizations.py."""

    log_p: torch.Tensor  # [B, L, V] base log-probabilities, float32
    direction: torch.Tensor  # [B, L, V]
    norm: torch.Tensor | None  # [B, L]


class BaseMismatchError(ValueError):
    """A guide or a sample set met a base model or tokenizer other than the one it was made with."""


def check_same_base(
    recorded: dict[str, Any], given: dict[str, Any], what: str, given_name: str | None = None
) -> None:
    """Refuse a guide or sample set on another base: compare the recorded weights and tokenizer hashes.

    ``recorded`` and ``given`` map ``base_fingerprint`` / ``tokenizer_fingerprint`` to a hash or None (unknown:
    not compared); ``what`` names the guide or samples in the message.
    """
    problems = []
    for key, label in (("base_fingerprint", "weights"), ("tokenizer_fingerprint", "tokenizer")):
        a, b = recorded.get(key), given.get(key)
        if a is not None and b is not None and a != b:
            problems.append(f"{label} hash {a} there, {b} here")
    if problems:
        name = recorded.get("base_model_name")
        raise BaseMismatchError(
            f"{what} was made with base {name!r} but the given base{f' {given_name!r}' if given_name else ''} "
            f"differs ({'; '.join(problems)}): use the base and tokenizer it was made with, or override with "
            "--allow-base-mismatch (allow_base_mismatch=True in Python) if you are sure they are the same model"
        )


def check_candidates(guide: Guide, candidates: int | None) -> None:
    """Refuse a candidate count that is not a positive integer, and candidates on a guide without a module."""
    if candidates is None:
        return
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(
            f"candidates must be a positive integer (the top-k of p to guide) or None, got {candidates!r}"
        )
    if guide.module is None:
        raise ValueError(
            "candidates is an option of the module variants; dinado-merge's adapted model is q_theta itself and "
            "costs no more than the base: decode it without candidates"
        )


class Guide(nn.Module):
    """A frozen base model with the learned value module of one variant.

    Build with :meth:`create`, train with :func:`dinado.train`, decode with :func:`dinado.generate`.

    The caller's ``base_model`` is never changed: ``guide.base`` is a new module tree over the same weight
    memory (:func:`shared_weight_copy`; no weight is copied), frozen and in eval mode, into which
    ``dinado-merge`` injects its LoRA layers. The caller's model keeps computing p with its own training mode
    and ``requires_grad`` flags. The guide sees weights changed in place through the caller's model later,
    but not ``base_model.to(...)``: move the guide itself.
    """

    def __init__(self, base_model: PreTrainedModel, config: GuideConfig) -> None:
        super().__init__()
        if not isinstance(base_model, PreTrainedModel):
            raise TypeError(
                f"base_model must be a transformers PreTrainedModel, got {type(base_model).__name__}"
            )
        self.config = config
        self.parameterization: Parameterization = parameterization_for(config.variant, config.consistency)
        # The caller's model is left as it is (mode, grad flags, module tree): the guide freezes and wraps a
        # copy of its module tree that shares the weight memory (see shared_weight_copy).
        base_model = shared_weight_copy(base_model)
        base_model.requires_grad_(False)
        base_model.eval()
        hidden = base_hidden_size(base_model)
        vocab = base_vocab_size(base_model)
        self.encoder_decoder = is_encoder_decoder(base_model)
        if self.encoder_decoder:
            decoder_start_token_id(base_model)  # fail now, not at the first batch
        if config.uses_lora:
            lora = lora_config(
                base_model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules
            )
            self.base = wrap_peft(base_model, lora)
            self.module = None
            self.norm_head = NormHead(hidden)
        else:
            dim = config.module_dim or min(hidden, 1024)
            self.base = base_model
            self.module = GuideModule(
                base_hidden_size=hidden,
                vocab_size=vocab,
                dim=dim,
                num_layers=config.num_layers,
                num_heads=config.num_heads or default_num_heads(dim),
                max_positions=config.max_positions,
                with_norm=config.variant != "nado",
                head=config.head,
                token_size=self._input_embeddings().weight.shape[1] if config.read_tokens else None,
                pointer=config.pointer,
                head_rank=config.head_rank,
            )
            self.norm_head = None
        # the new parts live where the base's weights do (a base on a GPU gets its guide there too)
        device = next(base_model.parameters()).device
        for part in (self.module, self.norm_head):
            if part is not None:
                part.to(device)
        self._pass_positions = not self.encoder_decoder and accepts_argument(self.base, "position_ids")
        self.base.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls,
        base_model: PreTrainedModel,
        variant: str,
        tokenizer: Any = None,
        seed: int | None = None,
        **options: Any,
    ) -> Guide:
        """Build a guide of ``variant`` over a frozen ``base_model``; options are GuideConfig fields.

        ``seed``: initialise the guide's own random parameters (the module, the norm head, LoRA's A matrices)
        from this seed, leaving the global random state as it was; ``None`` draws them from the global state, so
        the guide then depends on everything that used it before (measured on SmolLM2 CommonGen: two DiNADO-Merge
        guides from different initial states differ by as much as independent runs, docs/results/commongen.md).
        """
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        allowed = set(GuideConfig.__dataclass_fields__) - {
            "variant",
            "base_model_name",
            "base_vocab_size",
            "base_hidden_size",
            "base_fingerprint",
            "extra",
        }
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise TypeError(
                f"unknown Guide option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(allowed))}"
            )
        if tokenizer is not None and "tokenizer_fingerprint" not in options:
            options["tokenizer_fingerprint"] = tokenizer_fingerprint(tokenizer)
        config = GuideConfig(
            variant=variant,
            base_model_name=getattr(base_model.config, "_name_or_path", None) or None,
            base_vocab_size=base_vocab_size(base_model),
            base_hidden_size=base_hidden_size(base_model),
            base_fingerprint=base_fingerprint(base_model),
            **options,
        )
        if seed is None:
            return cls(base_model, config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(base_model, config)

    def train(self, mode: bool = True) -> Guide:
        super().train(mode)
        self.base.eval()  # the base is frozen: its dropout stays off
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    # ------------------------------------------------------------------ forward passes
    def _input_embeddings(self) -> nn.Module:
        embeddings = unwrap_peft(self.base).get_input_embeddings()
        if embeddings is None:
            raise TypeError(
                f"{type(unwrap_peft(self.base)).__name__} has no input embeddings to read tokens with"
            )
        return embeddings

    def module_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the module reads besides the base's hidden states at the positions of ``input_ids`` [B, L]:
        the base's input embeddings of the tokens (``read_tokens``) and its output embeddings (tied head)."""
        dtype = next(self.module.parameters()).dtype
        extra: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.config.read_tokens:
                extra["token_embeds"] = self._input_embeddings()(input_ids).to(dtype)
            if self.config.head == "tied":
                extra["output_embeddings"] = unwrap_peft(self.base).get_output_embeddings().weight.to(dtype)
        return extra

    def run_module(
        self,
        hidden: torch.Tensor,  # [B, L_new, H] the base's last hidden states of the newest positions
        input_ids: torch.Tensor,  # [B, >= L_new] the tokens; the last L_new are those positions'
        attention_mask: torch.Tensor,  # [B, L_past + L_new]
        position_ids: torch.Tensor,  # [B, L_new]
        past_key_values: Any = None,
        use_cache: bool = False,
        memory: dict[str, torch.Tensor] | None = None,
        last_only: bool = False,
        candidates: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """The module's (direction [B, L_new, V], norm logit or None, cache) at the newest positions
        (``last_only``: at the newest one alone, L_new = 1; ``candidates`` [B, L_new, k]: at those tokens only).

        ``input_ids`` are all the tokens so far when the module has a pointer (it scores every earlier position);
        ``memory`` carries the pointer's keys of the past positions from one decoding step to the next.
        """
        dtype = next(self.module.parameters()).dtype
        return self.module(
            hidden.to(dtype),
            attention_mask,
            position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            token_ids=input_ids if self.config.pointer else None,
            memory=memory,
            last_only=last_only,
            candidates=candidates,
            **self.module_inputs(input_ids[:, -hidden.shape[1] :]),
        )

    def _base_kwargs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_input_ids: torch.Tensor | None,
        encoder_attention_mask: torch.Tensor | None,
    ) -> dict[str, Any]:
        if self.encoder_decoder:
            if encoder_input_ids is None:
                raise ValueError(
                    "this guide's base is an encoder-decoder model: pass the source as encoder_input_ids "
                    "(input_ids are the decoder tokens, starting with the decoder start token)"
                )
            if encoder_attention_mask is None:
                encoder_attention_mask = torch.ones_like(encoder_input_ids)
            return {
                "input_ids": encoder_input_ids,
                "attention_mask": encoder_attention_mask,
                "decoder_input_ids": input_ids,
                "decoder_attention_mask": attention_mask,
                "use_cache": False,
            }
        if encoder_input_ids is not None:
            raise ValueError(
                "encoder_input_ids given, but this guide's base is a decoder-only model: put the prompt "
                "at the start of input_ids instead"
            )
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "use_cache": False,
        }
        if self._pass_positions:
            kwargs["position_ids"] = position_ids_from_mask(attention_mask)
        return kwargs

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_input_ids: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> GuideOutputs:
        """Raw outputs at every position of a (right- or left-) padded batch.

        Encoder-decoder bases: ``input_ids`` are the decoder tokens (decoder start token first, right-padded)
        and ``encoder_input_ids``/``encoder_attention_mask`` the source; every output is per decoder position.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = self._base_kwargs(input_ids, attention_mask, encoder_input_ids, encoder_attention_mask)
        if self.module is not None:
            with torch.no_grad(), capture_hidden(self.base) as cap:
                log_p = F.log_softmax(self.base(**kwargs).logits.float(), dim=-1)
            hidden = cap.pop().detach()
            direction, norm, _ = self.run_module(
                hidden, input_ids, attention_mask, position_ids_from_mask(attention_mask)
            )
            return GuideOutputs(log_p=log_p, direction=direction.float(), norm=norm)
        with torch.no_grad(), self.base.disable_adapter():
            log_p = F.log_softmax(self.base(**kwargs).logits.float(), dim=-1)
        with capture_hidden(self.base) as cap:
            log_pi = F.log_softmax(self.base(**kwargs).logits.float(), dim=-1)
        hidden = cap.pop()
        direction = log_pi.clamp(min=LOG_FLOOR) - log_p.clamp(min=LOG_FLOOR)
        norm = self.norm_head(hidden.to(next(self.norm_head.parameters()).dtype)).float()
        return GuideOutputs(log_p=log_p, direction=direction, norm=norm)

    def next_token_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        alpha: float = 1.0,
        encoder_input_ids: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        candidates: int | None = None,
    ) -> torch.Tensor:
        """log q_theta of the next token after every position, [B, L, V]: what decoding samples from.

        ``candidates=k``: the candidate-restricted q_k that decoding with ``candidates=k`` samples from (the
        guidance on p's top-k tokens only, :meth:`Parameterization.candidate_log_q`); here computed from the
        full direction, as a reference for that fast path.
        """
        out = self(input_ids, attention_mask, encoder_input_ids, encoder_attention_mask)
        return self.log_q(out, alpha, candidates, input_ids, attention_mask)

    def log_q(
        self,
        out: GuideOutputs,
        alpha: float = 1.0,
        candidates: int | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log q_theta [B, L, V] from this guide's outputs on ``input_ids`` (or, with ``candidates=k``, q_K: the
        guidance on p's top-k tokens and the tokens so far at each position, :func:`candidate_set`)."""
        if candidates is None:
            return self.parameterization.log_q(out.log_p, out.direction, alpha)
        check_candidates(self, candidates)
        if input_ids is None:
            raise ValueError("candidates need the input_ids (the sequence's own tokens are candidates)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        length = input_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        present = causal[None] & attention_mask.bool()[:, None, :]  # [B, t, j]: token j is there at t
        tokens = input_ids[:, None, :].expand(-1, length, -1)
        ids = candidate_set(out.log_p, candidates, tokens, present)
        return self.parameterization.candidate_log_q(out.log_p, ids, out.direction.gather(-1, ids), alpha)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write the config (JSON) and only the guide's own weights (safetensors), each atomically."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state().items()}
        with atomic_file(path / WEIGHTS_NAME) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "variant": self.config.variant})
        atomic_write_text(path / CONFIG_NAME, self.config.to_json())

    @classmethod
    def from_pretrained(
        cls,
        save_directory: str | os.PathLike,
        base_model: PreTrainedModel,
        tokenizer: Any = None,
        allow_base_mismatch: bool = False,
    ) -> Guide:
        """Rebuild a saved guide over ``base_model``.

        Refuses a base of another vocabulary or width, and (:class:`BaseMismatchError`, unless
        ``allow_base_mismatch=True``) a base whose weights differ from the one the guide was trained on, or a
        ``tokenizer`` other than the one recorded at :meth:`create`.
        """
        path = Path(save_directory)
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (config_path, weights_path):
            if not f.is_file():
                raise FileNotFoundError(
                    f"{f} not found: {path} is not a saved dinado guide (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
                )
        config = GuideConfig.from_dict(json.loads(config_path.read_text()))
        vocab, hidden = base_vocab_size(base_model), base_hidden_size(base_model)
        if (config.base_vocab_size, config.base_hidden_size) != (vocab, hidden):
            raise ValueError(
                f"the guide in {path} was trained on base {config.base_model_name!r} with vocabulary size "
                f"{config.base_vocab_size} and hidden size {config.base_hidden_size}, but the given base has "
                f"vocabulary size {vocab} and hidden size {hidden}; load it onto the base it was trained with"
            )
        if not allow_base_mismatch:
            given = {
                "base_fingerprint": base_fingerprint(base_model),
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
            }
            check_same_base(
                config.to_dict(),
                given,
                f"the guide in {path}",
                getattr(base_model.config, "_name_or_path", None),
            )
        guide = cls(base_model, config)
        state = load_file(str(weights_path))
        own = guide.trainable_state()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(
                f"{weights_path} does not match a {config.variant} guide over this base: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, param in own.items():
                if state[name].shape != param.shape:
                    raise ValueError(
                        f"{weights_path}: {name} has shape {tuple(state[name].shape)}, "
                        f"expected {tuple(param.shape)} for this base"
                    )
                param.copy_(state[name].to(param.dtype))
        return guide

    # ------------------------------------------------------------------ merge
    def merge(self, adapter_scale: float = 1.0) -> PreTrainedModel:
        """DiNADO-Merge: a plain transformers model with the LoRA direction folded into its weights.

        Its own ``generate()`` samples from q_theta at the base model's cost. The guide is left intact.
        ``adapter_scale`` multiplies the adapter's weight change before it is folded in (PEFT's
        ``rescale_adapter_scale``): 1 gives q_theta; another value is a strength in weight space, *not*
        ``p * D^alpha`` (which would need the base's distribution at every step), so choose it on held-out
        conditions and report it.
        """
        if not math.isfinite(adapter_scale) or adapter_scale < 0:
            raise ValueError(f"adapter_scale must be a finite number >= 0, got {adapter_scale!r}")
        if not self.config.uses_lora:
            raise ValueError(
                f"merge() needs variant 'dinado-merge'; a {self.config.variant} guide keeps a separate module "
                "that must run beside the base (use dinado.generate, or `dinado generate --guide`)"
            )
        if is_quantized(self.base):
            raise ValueError(
                "refusing to merge a LoRA adapter into quantised weights: load the base in float"
            )
        from peft.helpers import rescale_adapter_scale

        work = copy.deepcopy(self.base)
        with rescale_adapter_scale(work, float(adapter_scale)):  # 1.0 leaves the scaling as it is
            merged = work.merge_and_unload()
        merged.eval()
        return merged
