"""Guide: a frozen base model plus the learned value module of one NADO/DiNADO variant."""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import os
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .config import GuideConfig
from .io import atomic_file, atomic_write_text, tokenizer_fingerprint
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


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as transformers' generate() computes them for left-padded batches."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def unwrap_peft(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def wrap_peft(model: nn.Module, peft_config: Any) -> nn.Module:
    """``peft.get_peft_model`` without the FutureWarning it triggers in transformers 5.x.

    PEFT reads the model's deprecated ``is_gradient_checkpointing`` property, which warns on every guide or
    adapter built; only that warning, raised by this call, is hidden.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return get_peft_model(model, peft_config)


@contextmanager
def eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    """Run ``modules`` in eval mode (dropout off) inside the block; ``None`` entries are skipped.

    Afterwards every submodule gets back its own ``training`` flag exactly as it was, so a caller's mixed
    modes (a model in training with one part frozen in eval) survive. For sampling and scoring passes: a
    model built from a config starts in training mode, and its dropout would change every probability.
    """
    saved: dict[int, tuple[nn.Module, bool]] = {}
    for module in modules:
        if isinstance(module, nn.Module):
            for sub in module.modules():
                saved.setdefault(id(sub), (sub, sub.training))
    try:
        for module in modules:
            if isinstance(module, nn.Module):
                module.eval()
        yield
    finally:
        for sub, training in saved.values():
            sub.training = training


def is_encoder_decoder(model: nn.Module) -> bool:
    """True for sequence-to-sequence bases (Marian, T5, BART, ...), whose output is the decoder's."""
    return bool(getattr(getattr(unwrap_peft(model), "config", None), "is_encoder_decoder", False))


def decoder_start_token_id(model: nn.Module) -> int:
    """The token an encoder-decoder base's decoder starts from (generation config first, then config)."""
    inner = unwrap_peft(model)
    for cfg in (getattr(inner, "generation_config", None), inner.config):
        start = getattr(cfg, "decoder_start_token_id", None) if cfg is not None else None
        if start is not None:
            return int(start)
    raise ValueError(
        f"{type(inner).__name__} has no decoder_start_token_id in its config or generation config: "
        "set model.generation_config.decoder_start_token_id"
    )


def base_body(model: nn.Module) -> nn.Module:
    """The module whose first output is the last hidden state the LM head reads.

    GPT2Model inside GPT2LMHeadModel, ...; for an encoder-decoder base, its decoder (the guide conditions on
    the source through the decoder's cross-attention, as the LM head does).
    """
    inner = unwrap_peft(model)
    if is_encoder_decoder(inner):
        decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
        if decoder is None:
            raise TypeError(
                f"{type(inner).__name__} is an encoder-decoder model without get_decoder(); dinado reads "
                "the decoder's hidden states and cannot find them"
            )
        return decoder
    body = getattr(inner, "base_model", None)
    if body is None or body is inner:
        raise TypeError(
            f"{type(inner).__name__} does not expose its transformer body as .base_model; "
            "dinado needs a transformers PreTrainedModel with a language-model head"
        )
    return body


def shared_weight_copy(model: nn.Module) -> nn.Module:
    """A new module tree over the same weight memory: what a guide wraps instead of the caller's model.

    Every submodule is a new object (its own ``training`` flag, hooks and child registry, so ``eval()`` and
    PEFT's in-place LoRA injection touch only the copy), and every parameter a new ``nn.Parameter`` viewing
    the original's storage (its own ``requires_grad``). Buffers, configs, generation configs and any other
    attribute are shared. Tied weights stay tied and shared submodules stay shared. Extra memory: the module
    and parameter objects only, no weights. Weights changed in place later through the caller's model (an
    optimizer step) are seen by the copy; ``model.to(...)`` is not (move the guide itself).

    Methods and ``functools.partial`` objects bound to a module as instance attributes (the forward that
    accelerate installs on a dispatched model) are rebound to its copy. Parameter subclasses (e.g. quantised
    weights carrying their quantisation state) are shared as they are: freezing the copy then freezes them in
    the caller's model too (quantised weights are frozen anyway).
    """
    params: dict[int, nn.Parameter] = {}
    modules: dict[int, nn.Module] = {}

    def alias(p: nn.Parameter | None) -> nn.Parameter | None:
        if p is None or type(p) is not nn.Parameter:
            return p
        if id(p) not in params:
            params[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
        return params[id(p)]

    def copy_module(m: nn.Module | None) -> nn.Module | None:
        if m is None:
            return None
        if id(m) not in modules:
            new = copy.copy(m)  # shallow: a new object whose __dict__ values are still m's
            modules[id(m)] = new
            for key, value in list(vars(new).items()):
                if isinstance(value, (dict, set, list)):  # parameter/child/buffer/hook registries
                    vars(new)[key] = copy.copy(value)
                elif isinstance(value, types.MethodType) and value.__self__ is m:
                    vars(new)[key] = types.MethodType(value.__func__, new)  # e.g. accelerate's _old_forward
                elif isinstance(value, functools.partial) and value.args and value.args[0] is m:
                    # e.g. the forward accelerate installs on a dispatched model: partial(new_forward, module)
                    rebound = functools.partial(value.func, new, *value.args[1:], **value.keywords)
                    vars(rebound).update(vars(value))
                    vars(new)[key] = rebound
            for k, v in m._parameters.items():
                new._parameters[k] = alias(v)
            for k, v in m._modules.items():
                new._modules[k] = copy_module(v)
        return modules[id(m)]

    return copy_module(model)


class HiddenCapture:
    """Holds the last hidden states of every forward pass of a base model's body since the last ``pop``.

    A chunked prefill (``prefill_chunk_size``) runs the body once per chunk before the first decoding step: the
    chunks are joined along the positions, so the guide reads every prompt position.
    """

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.parts.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    def pop(self) -> torch.Tensor:
        if not self.parts:
            raise RuntimeError("the base model ran no forward pass that dinado could observe")
        parts, self.parts = self.parts, []
        if len(parts) == 1:
            return parts[0]
        if len({p.shape[0] for p in parts}) > 1:
            raise RuntimeError(
                f"the base ran {len(parts)} forward passes of different batch sizes "
                f"({[p.shape[0] for p in parts]}) between two decoding steps: dinado cannot tell which states "
                "belong to which sequence"
            )
        return torch.cat(parts, dim=1)


@contextmanager
def capture_hidden(model: nn.Module) -> Iterator[HiddenCapture]:
    """Record the base body's last hidden states through a forward hook: no extra compute."""
    capture = HiddenCapture()
    handle = base_body(model).register_forward_hook(capture)
    try:
        yield capture
    finally:
        handle.remove()


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(unwrap_peft(model).forward).parameters


def base_vocab_size(model: nn.Module) -> int:
    head = unwrap_peft(model).get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def base_hidden_size(model: nn.Module) -> int:
    return int(model.config.get_text_config().hidden_size)


def base_fingerprint(model: nn.Module, entries: int = 64) -> str:
    """A short hash of a base model's weights: up to ``entries`` evenly spaced values of every parameter, as
    float32, in order. LoRA parameters (a DiNADO-Merge guide's adapter) are left out, so a base wrapped by
    a guide hashes as it did before. Cheap (no pass over all weights) and exact: another model, other
    weights or another dtype give another hash.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in unwrap_peft(model).named_parameters():
            if "lora_" in name:
                continue
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // entries)
            values = flat[::step][:entries].to("cpu", torch.float32).contiguous()
            digest.update(str(tuple(param.shape)).encode())
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


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


def _is_quantized(model: nn.Module) -> bool:
    """True when the weights are held quantised (LoRA cannot be folded into them).

    Integer-typed parameters (bitsandbytes, GGUF blocks kept packed, ...) are quantised. A model loaded
    through a transformers quantizer is too, unless its weights were unpacked at load time into plain float
    ones: ``quantization_config.dequantize``, or a GGUF file (SmolLM2's named base) that transformers
    dequantises when it has no matmul kernel for it (its packed blocks would be uint8 parameters).
    """
    inner = unwrap_peft(model)
    if any(not p.dtype.is_floating_point for p in inner.parameters()):
        return True
    quantizer = getattr(inner, "hf_quantizer", None)
    if quantizer is None:
        return bool(getattr(inner, "is_quantized", False))
    config = getattr(quantizer, "quantization_config", None)
    if getattr(config, "dequantize", False):
        return False
    return getattr(config, "quant_method", None) != "gguf"


def check_candidates(guide: Guide, candidates: int | None) -> None:
    """Refuse a candidate count that is not a positive integer, or candidates on a guide without a module."""
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
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.lora_target_modules,
                bias="none",
                task_type="SEQ_2_SEQ_LM" if self.encoder_decoder else "CAUSAL_LM",
                # GPT-2 style Conv1D layers store weights transposed; tell PEFT instead of letting it guess
                fan_in_fan_out=any(isinstance(m, Conv1D) for m in base_model.modules()),
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
        self._pass_positions = not self.encoder_decoder and _accepts(self.base, "position_ids")
        self.base.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(
        cls, base_model: PreTrainedModel, variant: str, tokenizer: Any = None, **options: Any
    ) -> Guide:
        """Build a guide of ``variant`` over a frozen ``base_model``; options are GuideConfig fields."""
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
    def merge(self) -> PreTrainedModel:
        """DiNADO-Merge: a plain transformers model with the LoRA direction folded into its weights.

        Its own ``generate()`` samples from q_theta at the base model's cost. The guide is left intact.
        """
        if not self.config.uses_lora:
            raise ValueError(
                f"merge() needs variant 'dinado-merge'; a {self.config.variant} guide keeps a separate module "
                "that must run beside the base (use dinado.generate, or `dinado generate --guide`)"
            )
        if _is_quantized(self.base):
            raise ValueError(
                "refusing to merge a LoRA adapter into quantised weights: load the base in float"
            )
        merged = copy.deepcopy(self.base).merge_and_unload()
        merged.eval()
        return merged
