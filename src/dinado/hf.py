"""Everything that adapts dinado to transformers and PEFT models, in one place.

Unwrapping PEFT, encoder-decoder differences, the body whose hidden states a guide reads (and the hook that
captures them), positions of left-padded batches, sizes and fingerprints of a base, length checks, the one
LoRA config builder, and loading a base by hub id, local path, GGUF file or named offline base
(:mod:`dinado.bases`). Nothing here knows about guides, oracles or samples.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import json
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from .bases import NAMED_BASES, resolve_base


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


def last_hidden_state(output: Any) -> torch.Tensor:
    """The last hidden states of a body's output (a ModelOutput, or a tuple whose first entry they are)."""
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


class HiddenCapture:
    """Holds the last hidden states of every forward pass of a base model's body since the last ``pop``.

    A chunked prefill (``prefill_chunk_size``) runs the body once per chunk before the first decoding step: the
    chunks are joined along the positions, so the guide reads every prompt position.
    """

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.parts.append(last_hidden_state(output))

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


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(attribute name, stack) of the body's decoder layers: the child ModuleList with one entry per hidden
    layer (``layers`` in Llama, ``h`` in GPT-2), or None when the body keeps them otherwise."""
    body = base_body(model)
    count = getattr(unwrap_peft(model).config.get_text_config(), "num_hidden_layers", None)
    for name, child in body.named_children():
        if isinstance(child, nn.ModuleList) and len(child) > 0 and len(child) == count:
            return name, child
    return None


def _layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _found_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    found = decoder_layers(model)
    if found is None:
        raise TypeError(f"cannot find the decoder layers of {type(unwrap_peft(model)).__name__}")
    return found


@contextmanager
def capture_layer_input(model: nn.Module, index: int) -> Iterator[list[torch.Tensor]]:
    """Record the hidden states decoder layer ``index`` reads, one tensor per forward pass of the body."""
    seen: list[torch.Tensor] = []
    handle = _found_decoder_layers(model)[1][index].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(_layer_input(args, kwargs)), with_kwargs=True
    )
    try:
        yield seen
    finally:
        handle.remove()


@contextmanager
def start_at_layer(model: nn.Module, index: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block the body skips its decoder layers below ``index``, and layer ``index`` reads ``hidden``
    (the states it read on the same tokens, e.g. from :func:`capture_layer_input`) instead of what the body
    hands it: the bottom of a stack that nothing below ``index`` changes need not be recomputed. Embeddings,
    positions, masks and everything above run as usual. Callers check the result against a full pass once
    (an architecture that indexes its layers by their position could differ)."""
    name, layers = _found_decoder_layers(model)
    body = base_body(model)
    kept = nn.ModuleList(list(layers)[index:])

    def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = kept[0].register_forward_pre_hook(feed, with_kwargs=True)
    body._modules[name] = kept
    try:
        yield
    finally:
        body._modules[name] = layers
        handle.remove()


def accepts_argument(model: nn.Module, name: str) -> bool:
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


def is_quantized(model: nn.Module) -> bool:
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


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short stable hash of a tokenizer's vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in getattr(tokenizer, "all_special_tokens", []))
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def check_length(model, prompt_length: int, max_new_tokens: int | None) -> None:
    """Refuse a generation that would run past the model's position embeddings (an opaque IndexError)."""
    config = getattr(unwrap_peft(model), "config", None)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None
    if limit is None or max_new_tokens is None:
        return
    if getattr(config, "is_encoder_decoder", False):
        if prompt_length > limit or 1 + max_new_tokens > limit:
            raise ValueError(
                f"a source of {prompt_length} tokens or 1 + max_new_tokens={max_new_tokens} decoder tokens "
                f"exceeds the model's {limit} positions: lower max_new_tokens or shorten the sources"
            )
        return
    if prompt_length + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {prompt_length} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"{limit} positions: lower max_new_tokens or shorten the prompts"
        )


def _named() -> list[str]:
    return sorted(NAMED_BASES)


def _looks_like_path(name: str) -> bool:
    """True for a name that can only be a local path (a hub id is ``name`` or ``org/name``)."""
    if name.startswith(("/", "./", "../", "~", ".")) or "\\" in name or name.count("/") > 1:
        return True
    head, sep, _ = name.partition("/")
    return bool(sep) and Path(head).is_dir()  # runs/base, where ./runs exists


def check_local_model(name_or_path: str, gguf_file: str | None = None) -> None:
    """Fail at once, with a hint, on a local path that holds no transformers model (never ask the hub)."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if _looks_like_path(name_or_path):
            raise FileNotFoundError(
                f"no such directory: {name_or_path} (a local model path; check the path, or give a hub id "
                "such as 'gpt2' or 'org/name', or a named base: " + ", ".join(_named()) + ")"
            )
        return
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name_or_path} is a file: give the directory of a saved model (config.json and weights)"
        )
    if (path / "config.json").is_file() or gguf_file is not None:
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


def _forget_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF file is dequantised to plain float weights at load time, but transformers keeps its quantizer on the
    model, and save_pretrained then refuses ("quantized with gguf and is not serializable"): `dinado merge
    --base smollm2-135m-instruct` could not save. Drop the marks so the model saves and reloads as a plain one."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, transformers' GGUF loader parses each file once and builds each tensor-name map once.

    Loading a GGUF model reads the file three times (config, weights, tokenizer), and each ``gguf.GGUFReader``
    parses every metadata field, SmolLM2's 49k-token vocabulary included, one numpy view at a time (~3 s each);
    the weight loader also rebuilds the same ``gguf.get_tensor_name_map(arch, blocks)`` for each of the model's
    ~400 modules (~4 s in all). Both are pure functions of their arguments over a read-only memory map, so the
    block hands out one reader per path and one map per (arch, blocks). transformers imports both names from
    ``gguf`` when it loads, so they are swapped on that module and restored afterwards."""
    try:
        import gguf
    except ImportError:  # transformers says what to install when it needs it
        yield
        return
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.cache(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def load_model(
    name_or_path: str, tokenizer: str | None = None, gguf_file: str | None = None
) -> tuple[Any, Any]:
    """A base model and its tokenizer, in eval mode, with a pad token.

    ``name_or_path``: a hub id, a local directory, a ``.gguf`` file, or a named offline base such as
    ``"smollm2-135m-instruct"`` (:mod:`dinado.bases`); ``gguf_file`` names a GGUF file inside the directory or
    hub repository. GGUF weights are dequantised to float32 by transformers (needs the ``gguf`` package).
    ``AutoModelForSeq2SeqLM`` for an encoder-decoder config (Marian, T5, BART), else ``AutoModelForCausalLM``;
    a tokenizer without a pad token pads with EOS (GPT-2 style). The model's ``config._name_or_path`` is the
    name given here, so guides and samples record it.
    """
    if name_or_path not in NAMED_BASES and not name_or_path.lower().endswith(".gguf"):
        check_local_model(name_or_path, gguf_file)
    source, gguf = resolve_base(name_or_path, gguf_file)
    kwargs: dict[str, Any] = {"gguf_file": gguf, "dtype": torch.float32} if gguf is not None else {}
    with _gguf_parsed_once() if gguf is not None else nullcontext():
        # the config is read once and handed on (for a GGUF file, a read of the config parses the file's metadata)
        config = AutoConfig.from_pretrained(source, **kwargs)
        seq2seq = getattr(config, "is_encoder_decoder", False)
        model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(
            source, config=config, **kwargs
        )
        if tokenizer is not None:
            tok = AutoTokenizer.from_pretrained(tokenizer)
        else:
            extra = {"gguf_file": gguf, "config": config} if gguf is not None else {}
            tok = AutoTokenizer.from_pretrained(source, **extra)
    if gguf is not None:
        model.config._name_or_path = name_or_path if gguf_file is None else f"{name_or_path}/{gguf_file}"
        _forget_gguf_quantizer(model)
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def lora_config(
    model: nn.Module, r: int, alpha: int, dropout: float = 0.0, target_modules: str | list[str] = "all-linear"
) -> Any:
    """The ``peft.LoraConfig`` dinado puts on a base (a DiNADO-Merge guide, the SFT-LoRA baseline).

    The task type follows the base (sequence-to-sequence or causal), biases stay frozen, and GPT-2 style
    ``Conv1D`` layers, which store their weights transposed, are declared instead of left for PEFT to guess.
    """
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        bias="none",
        task_type="SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM",
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
    )
