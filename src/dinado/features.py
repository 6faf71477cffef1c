"""Training without re-running the frozen base: its hidden states, computed once per sample set.

For the module variants (NADO, DiNADO-Soft, DiNADO-Hard) the base is frozen, and the loss reads only two things
of it: the last hidden states the guide module reads, and, per position, log p through a log-normaliser over
the vocabulary and the next token (parameterizations.PositionStats). So :func:`precompute_features` runs the
base once over every sample (no LM head, no gradients) and keeps its last hidden states, [tokens, H], in a
:class:`FeatureCache`; each training step then runs only the guide module, and log p is recomputed through the
base's LM head from the cached hidden state, only at the positions the loss reads and one chunk of rows at a
time (:class:`_VocabularyStats`), so no [B, L, V] tensor is ever built.

Memory: the cache holds tokens x H values in its ``dtype`` (the base's own by default; bfloat16/float16 halve a
float32 base's cache at a small cost in accuracy), in memory, or in a safetensors file with ``path=`` that is
read a batch of rows at a time (memory-mapped: bounded by the OS page cache, not by the size of the set).
A training step holds at most ``CHUNK_ELEMENTS`` x 4 bytes for each of three full-vocabulary buffers, plus the
softmax weights of the step's rows for the backward pass while they fit in ``SAVE_LIMIT_BYTES`` (above that
they are recomputed in the backward pass: two more matrix products per chunk, no memory).

DiNADO-Merge trains a LoRA adapter inside the base, so the base's last hidden states change at every step; but
the decoder layers below the lowest adapted one do not. Its cache holds the hidden states that layer reads
(``metadata["layer"]``) and the base's own last hidden states, and each step runs only the layers from there up, with
the adapter (log p comes from the cached last hidden states), and the LM head only at the positions the loss
reads (:func:`dinado.hf.start_at_layer`). With LoRA on
the top 6 of SmolLM2's 30 layers that skips four fifths of the stack; with LoRA everywhere (the default) the
cache is the embeddings' output and only the LM head's rows are saved. Encoder-decoder bases work the same
way for the module variants (the cache holds the decoder's hidden states; the source reaches them through
cross-attention when they are computed); DiNADO-Merge on them trains without a cache. A base whose logits are
not its LM head of the last hidden state as :func:`lm_head_logits` computes them is refused at the first batch,
by comparing with the base's own logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._utils import atomic_file
from .data import Batch, SampleSet
from .guide import Guide
from .hf import (
    base_body,
    base_vocab_size,
    capture_hidden,
    capture_layer_input,
    decoder_layers,
    eval_mode,
    last_hidden_state,
    position_ids_from_mask,
    start_at_layer,
    unwrap_peft,
)
from .numerics import LOG_FLOOR, TIE_TOLERANCE
from .parameterizations import PositionStats

CHUNK_ELEMENTS = 1 << 24  # rows x vocabulary per chunk of the full-vocabulary statistics (64 MiB in float32)
SAVE_LIMIT_BYTES = (
    1 << 30
)  # keep a step's softmax weights for the backward pass up to this size, else recompute
CACHE_FORMAT = "dinado-features-1"


class FeatureCacheError(ValueError):
    """Cached features cannot be used here: another variant, sample set or base, or an unsupported LM head."""


# ---------------------------------------------------------------------------------------------- the LM head
def lm_head_logits(
    model: torch.nn.Module, hidden: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The base's logits from its body's last hidden states, as its own forward computes them.

    The output embedding, with what some architectures add around it: T5's rescaling of the decoder output,
    BART/Marian's ``final_logits_bias``, Gemma-2's final soft-capping. :func:`precompute_features` checks the
    result against the base's own logits and refuses a base for which it differs. ``out`` (float32, [rows, V])
    receives the logits where the head is a plain bias-free linear map of float32 weights (saves an allocation),
    else it is ignored.
    """
    inner = unwrap_peft(model)
    config = inner.config
    plain = plain_head_weight(model)
    if plain is not None and out is not None and hidden.dtype == torch.float32:
        return torch.mm(hidden, plain.t(), out=out)
    if getattr(config, "scale_decoder_outputs", False) and hasattr(inner, "model_dim"):  # T5 family
        hidden = hidden * (inner.model_dim**-0.5)
    logits = inner.get_output_embeddings()(hidden)
    bias = getattr(inner, "final_logits_bias", None)
    if isinstance(bias, torch.Tensor):
        logits = logits + bias.to(logits.dtype)
    cap = getattr(config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def plain_head_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """The float32 weight W [V, H] when the base's logits are exactly ``hidden @ W.T`` (a bias-free linear head,
    nothing added around it: no T5 rescaling, no final logits bias, no soft-capping), else None."""
    inner = unwrap_peft(model)
    config = inner.config
    head = inner.get_output_embeddings()
    if (
        type(head) is not torch.nn.Linear
        or head.bias is not None
        or head.weight.dtype != torch.float32
        or (getattr(config, "scale_decoder_outputs", False) and hasattr(inner, "model_dim"))
        or isinstance(getattr(inner, "final_logits_bias", None), torch.Tensor)
        or getattr(config.get_text_config(), "final_logit_softcapping", None)
    ):
        return None
    return head.weight


def merge_start_layer(guide: Guide) -> tuple[int | None, str | None]:
    """For a DiNADO-Merge guide: (the lowest decoder layer its adapter changes, None), or (None, why its base's
    states cannot be cached)."""
    inner = type(unwrap_peft(guide.base)).__name__
    if guide.encoder_decoder:
        return None, (
            f"a {guide.config.variant} guide on an encoder-decoder base adapts the encoder too: it trains "
            "through the whole base (cache_features=False)"
        )
    found = decoder_layers(guide.base)
    if found is None:
        return (
            None,
            f"dinado cannot find the decoder layers of {inner} to cache what the adapter leaves alone",
        )
    layers = found[1]
    inside = {id(p) for layer in layers for p in layer.parameters()}
    outside = [n for n, p in guide.base.named_parameters() if p.requires_grad and id(p) not in inside]
    if outside:
        return (
            None,
            f"its adapter changes {outside[0]}, outside the decoder layers: nothing below it is fixed",
        )
    adapted = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    if not adapted:
        return None, "its adapter changes no decoder layer"
    return adapted[0], None


def cache_layer(guide: Guide) -> int | None:
    """What a cache for ``guide`` holds: the input of this decoder layer (DiNADO-Merge), or None for the base's
    last hidden states (the module variants)."""
    return merge_start_layer(guide)[0] if guide.module is None else None


def unsupported_reason(guide: Guide) -> str | None:
    """Why ``guide`` cannot train from cached features, or None when it can."""
    reason = merge_start_layer(guide)[1] if guide.module is None else None
    if reason is not None:
        return reason
    if unwrap_peft(guide.base).get_output_embeddings() is None:
        return f"{type(unwrap_peft(guide.base)).__name__} has no output embeddings to recompute log p with"
    return None


# ------------------------------------------------------------------------- full-vocabulary statistics of rows
class _BufferPool:
    """[rows, V] buffers (float32 unless asked otherwise) kept from one training step to the next, on CPU.

    A fresh buffer of that size costs about a fifth of the matrix product that fills it in page faults (measured
    here); CUDA's caching allocator reuses memory by itself, so other devices always get a new buffer. A buffer is
    in the pool only while nobody uses it: a pass takes it and gives it back when done (a graph freed without its
    backward pass just drops its buffer). :func:`release_buffers` empties the pool (``train`` does at its end).
    """

    def __init__(self) -> None:
        self._free: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}

    def take(
        self, name: str, rows: int, vocab: int, device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        buffer = self._free.pop((name, vocab, dtype), None) if device.type == "cpu" else None
        if buffer is None or buffer.shape[0] < rows:
            # a quarter to spare on CPU: the rows of a step vary, and a buffer that grows by a few rows every step
            # would be a fresh one every step
            spare = rows + rows // 4 if device.type == "cpu" else rows
            buffer = torch.empty((spare, vocab), dtype=dtype, device=device)
        return buffer

    def give_back(self, name: str, buffer: torch.Tensor | None) -> None:
        if buffer is None or buffer.device.type != "cpu":
            return
        key = (name, buffer.shape[1], buffer.dtype)
        if key not in self._free or self._free[key].shape[0] < buffer.shape[0]:
            self._free[key] = buffer

    def clear(self) -> None:
        self._free.clear()


_POOL = _BufferPool()


def release_buffers() -> None:
    """Free the full-vocabulary buffers the cached training path keeps between steps (a few hundred MiB at a
    vocabulary of 50k): ``train`` calls it at its end."""
    _POOL.clear()


def _chunk_statistics(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    base_rows: torch.Tensor,
    head: Callable[..., torch.Tensor],
    parameterization,
    want_max: bool,
    want_grad: bool,
    logits_out: torch.Tensor,
    direction_out: torch.Tensor,
    scratch: torch.Tensor,
    pointer_ids: torch.Tensor | None = None,
    pointer_scores: torch.Tensor | None = None,
):
    """guided_lse [m], direction_max [m] or None, and for the backward pass d guided_lse / d direction [m, V]
    and the positions of the maximum (indices [m], or a mask [m, V] where some row has ties).

    ``logits_out``, ``direction_out`` and ``scratch`` are [m, V] float32 buffers; the weights are computed in
    ``logits_out`` (or in a new tensor where the LM head cannot write into it). ``pointer_scores`` [m, L] are
    added to the direction at the tokens ``pointer_ids`` [m, L] (a guide with a pointer), else None.
    """
    m = h.shape[0]
    # [m, V] base logits; their buffer becomes log p + guidance, then the softmax weights
    logits = head(base_rows, out=logits_out).float()
    if weight.dtype == torch.float32 and h.dtype == torch.float32:  # as the module's token head computes it
        direction = torch.addmm(bias, h, weight.t(), out=direction_out)
    else:
        direction = F.linear(h, weight, bias).float()
    if (
        pointer_ids is not None
    ):  # the pointer's copy scores [m, L] at the tokens [m, L] of each row's sequence
        direction.scatter_add_(1, pointer_ids, pointer_scores.float())
    direction_max = top_two = None
    if want_max:
        if direction.shape[-1] > 1:
            # the two largest: ties are rare, but occur (zero-initialised heads)
            top_two, top_index = direction.topk(2, dim=-1)
            direction_max = top_two[:, 0]
        else:
            direction_max = direction[:, 0]
            top_index = direction.new_zeros((m, 1), dtype=torch.long)
    # logsumexp by hand (torch.logsumexp is several times slower on CPU and allocates more)
    top = logits.amax(dim=-1, keepdim=True)
    scratch = torch.sub(logits, top, out=scratch)
    lse_p = scratch.exp_().sum(dim=-1).log_() + top.squeeze(-1)  # log-normaliser of p
    guidance = parameterization.guidance(direction)
    guided = logits.add_(guidance)  # log p + guidance, up to lse_p
    del guidance
    top = guided.amax(dim=-1, keepdim=True)
    total = guided.sub_(top).exp_().sum(dim=-1, keepdim=True)
    guided_lse = total.log().squeeze(-1) + top.squeeze(-1) - lse_p  # logsumexp_v(log p + guidance)
    weights = argmax = None
    if want_grad:
        weights = guided.div_(total)  # softmax(log p + guidance): d guided_lse / d guidance
        scale = parameterization.guidance_grad(direction)
        if scale is not None:
            weights.mul_(scale)
        if want_max:  # amax's gradient is shared among tied maxima (as torch.amax does)
            tied = top_two is not None and bool((top_two[:, 1] == top_two[:, 0]).any())
            argmax = direction == direction_max[:, None] if tied else top_index[:, 0]
    return guided_lse, direction_max, weights, argmax


class _VocabularyStats(torch.autograd.Function):
    """Position statistics of rows of module states under the module's token head (``weight``, ``bias``).

    ``guided_lse`` and ``direction_max`` [M] of the rows ``h`` [M, dim], whose base logits come from
    ``head(base_rows)`` ([M, H] cached hidden states), a chunk of rows at a time; and ``taken`` [K], the direction
    of the rows ``taken_h`` [K, dim] at the tokens ``taken_ids`` [K] (a dot product each). Never holds more than
    a chunk's [m, V] buffers, plus the softmax weights of all M rows for the backward pass when they fit in
    ``SAVE_LIMIT_BYTES`` (else the backward pass recomputes them chunk by chunk). The head's gradient is
    accumulated in float32 and handed back once (no [V, dim] scatter per statistic).
    """

    @staticmethod
    def forward(
        ctx,
        h,
        weight,
        bias,
        base_rows,
        taken_h,
        taken_ids,
        head,
        parameterization,
        want_max,
        chunk_rows,
        pointer_ids=None,
        pointer_scores=None,
    ):
        rows, vocab = h.shape[0], weight.shape[0]
        save = rows * vocab * 4 <= SAVE_LIMIT_BYTES
        lse_parts, max_parts, saved = [], [], []
        chunk = min(rows, chunk_rows)
        # the softmax weights of every row stay in one buffer until the backward pass (or one chunk's, reused)
        kept = _POOL.take("weights" if save else "logits", rows if save else chunk, vocab, h.device)
        direction_out = _POOL.take("direction", chunk, vocab, h.device)
        scratch = _POOL.take("scratch", chunk, vocab, h.device)
        for start in range(0, rows, chunk_rows):
            part = slice(start, start + chunk_rows)
            m = h[part].shape[0]
            lse, mx, weights, argmax = _chunk_statistics(
                h[part],
                weight,
                bias,
                base_rows[part],
                head,
                parameterization,
                want_max,
                save,
                kept[start : start + m] if save else kept[:m],
                direction_out[:m],
                scratch[:m],
                *_pointer_part(pointer_ids, pointer_scores, part),
            )
            lse_parts.append(lse)
            if want_max:
                max_parts.append(mx)
            if save:
                saved.append((weights, argmax))
        _POOL.give_back("direction", direction_out)
        _POOL.give_back("scratch", scratch)
        if not save:
            _POOL.give_back("logits", kept)
        ctx.kept = kept if save else None
        taken = (taken_h.float() * weight[taken_ids].float()).sum(-1) + bias[taken_ids].float()
        ctx.save_for_backward(h, weight, bias, base_rows, taken_h, taken_ids, pointer_ids, pointer_scores)
        ctx.head, ctx.parameterization = head, parameterization
        ctx.want_max, ctx.chunk_rows = want_max, chunk_rows
        ctx.saved_chunks = saved if save else None
        empty = h.new_zeros(0, dtype=torch.float32)
        guided_lse = torch.cat(lse_parts) if lse_parts else empty
        direction_max = torch.cat(max_parts) if max_parts else guided_lse.new_zeros(rows)
        if not want_max:
            ctx.mark_non_differentiable(direction_max)
        return guided_lse, direction_max, taken

    @staticmethod
    def backward(ctx, grad_lse, grad_max, grad_taken):
        h, weight, bias, base_rows, taken_h, taken_ids, pointer_ids, pointer_scores = ctx.saved_tensors
        need_h, need_w, need_b, _, need_taken_h = ctx.needs_input_grad[:5]
        need_pointer = len(ctx.needs_input_grad) > 11 and ctx.needs_input_grad[11]
        grad_h = torch.zeros_like(h) if need_h else None
        grad_pointer = torch.zeros_like(pointer_scores, dtype=torch.float32) if need_pointer else None
        grad_w = grad_b = None
        saved, ctx.saved_chunks = ctx.saved_chunks, None  # consumed (a second backward pass recomputes)
        kept, ctx.kept = ctx.kept, None
        chunk = min(h.shape[0], ctx.chunk_rows)
        vocab = weight.shape[0]
        buffers = {}
        if saved is None and chunk > 0:
            buffers = {
                name: _POOL.take(name, chunk, vocab, h.device) for name in ("logits", "direction", "scratch")
            }
        for index, start in enumerate(range(0, h.shape[0], ctx.chunk_rows)):
            part = slice(start, start + ctx.chunk_rows)
            m = h[part].shape[0]
            if saved is not None:
                weights, argmax = saved[index]
                saved[index] = None
            else:
                _, _, weights, argmax = _chunk_statistics(
                    h[part],
                    weight,
                    bias,
                    base_rows[part],
                    ctx.head,
                    ctx.parameterization,
                    ctx.want_max,
                    True,
                    buffers["logits"][:m],
                    buffers["direction"][:m],
                    buffers["scratch"][:m],
                    *_pointer_part(pointer_ids, pointer_scores, part),
                )
            grad_d = weights.mul_(grad_lse[part, None])  # [m, V], in place: the weights are used once
            if ctx.want_max and grad_max is not None:
                if argmax.dim() == 1:
                    grad_d.scatter_add_(1, argmax[:, None], grad_max[part, None])
                else:
                    share = argmax.float() / argmax.sum(-1, keepdim=True, dtype=torch.int32)
                    grad_d.add_(share.mul_(grad_max[part, None]))
            if need_pointer:
                grad_pointer[part] = grad_d.gather(1, pointer_ids[part])
            grad_m = grad_d.to(weight.dtype)
            if need_h:
                grad_h[part] = grad_m @ weight
            if need_w:
                if grad_w is None:
                    grad_w = (grad_m.t() @ h[part]).float()
                elif grad_m.dtype == torch.float32:
                    grad_w.addmm_(grad_m.t(), h[part])
                else:
                    grad_w.add_((grad_m.t() @ h[part]).float())
            if need_b:
                grad_b = grad_d.sum(0) if grad_b is None else grad_b.add_(grad_d.sum(0))
            del weights, grad_d, grad_m
        for name, buffer in buffers.items():
            _POOL.give_back(name, buffer)
        _POOL.give_back("weights", kept)
        # the dot products at the taken tokens
        grad_taken_h = None
        if grad_taken is not None:
            if need_taken_h:
                grad_taken_h = (grad_taken[:, None] * weight[taken_ids].float()).to(taken_h.dtype)
            if need_w:
                grad_w = grad_w if grad_w is not None else torch.zeros(weight.shape, device=weight.device)
                grad_w.index_add_(0, taken_ids, grad_taken[:, None] * taken_h.float())
            if need_b:
                grad_b = grad_b if grad_b is not None else torch.zeros(bias.shape, device=bias.device)
                grad_b.index_add_(0, taken_ids, grad_taken)
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            grad_taken_h,
            None,
            None,
            None,
            None,
            None,
            None,
            grad_pointer.to(pointer_scores.dtype) if grad_pointer is not None else None,
        )


def _pointer_part(
    pointer_ids: torch.Tensor | None, pointer_scores: torch.Tensor | None, part: slice
) -> tuple:
    """The pointer's (token ids, scores) of a chunk of rows, or (None, None) without a pointer."""
    if pointer_ids is None:
        return None, None
    return pointer_ids[part], pointer_scores[part]


def _chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk: at most CHUNK_ELEMENTS / vocab, in chunks of equal size (no short last chunk)."""
    most = max(1, CHUNK_ELEMENTS // vocab)
    chunks = max(1, -(-rows // most))
    return max(1, -(-rows // chunks))


def cached_position_stats(
    guide: Guide, batch: Batch, ce_positions: str, with_regularizer: bool
) -> PositionStats:
    """The objective's PositionStats from cached base hidden states (``batch.base_hidden``), without the base.

    Runs the guide module as :meth:`Guide.forward` does, then its token head and the base's LM head only at the
    positions the loss reads (``Parameterization.vocabulary_rows``), a chunk of rows at a time; the direction at
    the next token is a gathered dot product. Equal to ``position_stats`` of the full outputs at every position
    the loss reads.
    """
    module = guide.module
    if module is None:
        return _merge_position_stats(guide, batch, ce_positions, with_regularizer)
    param = guide.parameterization
    dtype = next(module.parameters()).dtype
    mask, ids, hidden = batch.attention_mask, batch.input_ids, batch.base_hidden
    extra = guide.module_inputs(ids)
    state, _ = module.trunk(
        hidden.to(dtype), mask, position_ids_from_mask(mask), token_embeds=extra.get("token_embeds")
    )  # [B, L, dim]
    norm = module.norm_head(state).float() if module.norm_head is not None else None
    head_weight, head_bias = module.head_weights(extra.get("output_embeddings"))
    if head_bias is None:  # the tied head: the base's embeddings alone, no per-token parameter
        head_bias = head_weight.new_zeros(head_weight.shape[0])
    comp, term = batch.completion_mask.bool(), batch.terminal_mask.bool()
    next_completion = F.pad(comp[:, 1:], (0, 1))
    next_ce = next_completion if ce_positions == "all" else F.pad(term[:, 1:], (0, 1))
    rows = param.vocabulary_rows(next_completion, next_ce, comp & ~term, with_regularizer)
    b, t = rows.nonzero(as_tuple=True)
    tb, tt = next_completion.nonzero(as_tuple=True)  # every prefix value reads the direction at its token
    pointer_ids = pointer_rows = taken_pointer = None
    if module.pointer is not None:  # copy scores [B, L, L]: added at the tokens of the row's own sequence
        scores = module.pointer(state, module.pointer.key(state), mask)
        pointer_ids, pointer_rows = ids[b], scores[b, t]
        taken_pointer = (scores[tb, tt] * (ids[tb] == ids[tb, tt + 1][:, None])).sum(-1).float()
    base = guide.base
    base_dtype = next(unwrap_peft(base).get_output_embeddings().parameters()).dtype

    def head_fn(rows_hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return lm_head_logits(base, rows_hidden.to(base_dtype), out=out)

    lse, mx, taken_values = _VocabularyStats.apply(
        module.head_input(state[b, t]),
        head_weight,
        head_bias,
        hidden[b, t],
        module.head_input(state[tb, tt]),
        ids[tb, tt + 1],
        head_fn,
        param,
        param.needs_direction_max,
        _chunk_rows(len(b), head_weight.shape[0]),
        pointer_ids,
        pointer_rows,
    )
    if taken_pointer is not None:
        taken_values = taken_values + taken_pointer
    batch_size, length = ids.shape
    zeros = torch.zeros((batch_size, length), dtype=torch.float32, device=ids.device)
    guided_lse = zeros.index_put((b, t), lse)
    direction_max = zeros.index_put((b, t), mx) if param.needs_direction_max else None
    taken = zeros[:, :-1].index_put((tb, tt), taken_values)  # [B, L-1]: the direction at x_{t+1}
    return PositionStats(guided_lse=guided_lse, direction_max=direction_max, taken=taken, norm=norm)


def _merge_position_stats(
    guide: Guide, batch: Batch, ce_positions: str, with_regularizer: bool
) -> PositionStats:
    """DiNADO-Merge's PositionStats from the cached input of its lowest adapted layer (``batch.base_hidden``).

    As :meth:`Guide.forward`: log p from the base without its adapter, log pi with it, the direction their clamped
    difference and the norm head on the adapted last hidden states; but the layers below the cached one are not
    run, log p comes from the cached last hidden states where the cache holds them (``batch.base_last_hidden``;
    else the layers above run a second time, without the adapter), and the LM head and everything over the
    vocabulary only at the rows the loss reads."""
    layer, reason = merge_start_layer(guide)
    if reason is not None:
        raise FeatureCacheError(f"cached features cannot train this guide: {reason}")
    param = guide.parameterization
    base = guide.base
    ids, mask = batch.input_ids, batch.attention_mask
    base_dtype = next(unwrap_peft(base).parameters()).dtype
    body = base_body(base)
    kwargs = guide._base_kwargs(ids, mask, None, None)
    with start_at_layer(base, layer, batch.base_hidden.to(base_dtype)):
        if (
            batch.base_last_hidden is not None
        ):  # the base's own last hidden states, cached with the layer's input
            plain = batch.base_last_hidden.to(base_dtype)
        else:
            with torch.no_grad(), base.disable_adapter():
                plain = last_hidden_state(body(**kwargs))
        adapted = last_hidden_state(body(**kwargs))
    comp, term = batch.completion_mask.bool(), batch.terminal_mask.bool()
    next_completion = F.pad(comp[:, 1:], (0, 1))
    next_ce = next_completion if ce_positions == "all" else F.pad(term[:, 1:], (0, 1))
    rows = param.vocabulary_rows(next_completion, next_ce, comp & ~term, with_regularizer)
    b, t = rows.nonzero(as_tuple=True)
    vocab, device = base_vocab_size(base), ids.device
    log_p_buffer = _POOL.take("merge_log_p", len(b), vocab, device)
    scratch = _POOL.take("merge_scratch", len(b), vocab, device)
    with torch.no_grad():
        log_p = _log_softmax_(
            lm_head_logits(base, plain[b, t], out=log_p_buffer[: len(b)]).float(), scratch[: len(b)]
        )
    _POOL.give_back("merge_scratch", scratch)
    weight = plain_head_weight(base)
    if weight is not None and not weight.requires_grad:  # the LM head runs inside, into a reused buffer
        source = adapted[b, t].float()
    else:
        source, weight = lm_head_logits(base, adapted[b, t]).float(), None  # log pi up to its normaliser
    norm_dtype = next(guide.norm_head.parameters()).dtype
    norm = guide.norm_head(adapted.to(norm_dtype)).float()
    following = F.pad(ids[:, 1:], (0, 1))[b, t]  # the next token (padding at the last position: never read)
    lse, mx, taken_values = _MergeStats.apply(source, log_p, following, param, weight)
    _POOL.give_back("merge_log_p", log_p_buffer)
    zeros = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    guided_lse = zeros.index_put((b, t), lse)
    direction_max = zeros.index_put((b, t), mx) if param.needs_direction_max else None
    taken = zeros.index_put((b, t), taken_values)[:, :-1]
    return PositionStats(guided_lse=guided_lse, direction_max=direction_max, taken=taken, norm=norm)


def _log_softmax_(rows: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``rows`` [M, V] turned into their log-softmax in place (``scratch``: a buffer of the same shape)."""
    rows.sub_(rows.amax(dim=-1, keepdim=True))
    return rows.sub_(torch.exp(rows, out=scratch).sum(dim=-1, keepdim=True).log_())


class _MergeStats(torch.autograd.Function):
    """DiNADO-Merge's statistics of rows [M, V] in one pass: from the adapted model's logits and the base's log p,
    the direction ``d = clamp(log_softmax(logits), LOG_FLOOR) - clamp(log_p, LOG_FLOOR)`` (as Guide.forward's),
    then ``logsumexp(log p + guidance(d))``, ``max d`` and ``d`` at the ``following`` tokens, with the gradient
    with respect to ``logits`` written out by hand. The same values as the composition of torch operations, at a
    fraction of its cost over a 49k vocabulary on CPU (no autograd graph of [M, V] intermediates; torch's
    logsumexp and amax backward passes are the slow part). The same gradients too, except that maxima within
    :data:`~dinado.numerics.TIE_TOLERANCE` of each other share the max's gradient as exact ties do (the cache's
    log p and the adapted pass differ by float noise, which at initialisation is all the direction holds).

    ``source`` is the logits, or, with ``weight`` (a frozen bias-free LM head [V, H]), the hidden rows [M, H]
    whose logits are ``source @ weight.T``: the product then runs inside, into a reused buffer, and the gradient
    comes back for the rows. Every [M, V] intermediate lives in buffers of :data:`_POOL` and is updated in place:
    on CPU a fresh 150 MiB tensor costs more in page faults than the arithmetic done on it (measured on SmolLM2:
    an out-of-place op 5-20 times slower than in place), which made this step most of a Merge training step."""

    @staticmethod
    def forward(ctx, source, log_p, following, param, weight=None):
        rows, vocab = source.shape[0], log_p.shape[-1]
        dtype = torch.float32 if weight is not None else source.dtype
        buffers = {name: _POOL.take(name, rows, vocab, source.device, dtype) for name in _MERGE_BUFFERS}
        logits, direction, scratch = (buffers[name][:rows] for name in _MERGE_BUFFERS)
        if weight is not None:
            torch.mm(source, weight.t(), out=logits)
        else:
            logits.copy_(source)
        top = logits.amax(dim=-1, keepdim=True)
        lse_logits = torch.sub(logits, top, out=scratch).exp_().sum(dim=-1, keepdim=True).log_().add_(top)
        torch.sub(logits, lse_logits, out=direction)  # log pi
        clamped = direction < LOG_FLOOR  # where clamp stops the gradient (as torch.clamp's backward)
        direction.clamp_(min=LOG_FLOOR).sub_(torch.clamp(log_p, min=LOG_FLOOR, out=scratch))
        top_two, top_index = direction.topk(2, dim=-1) if vocab > 1 else direction.max(-1, True)
        direction_max = top_two[:, 0]
        taken = direction.gather(-1, following[:, None]).squeeze(-1)
        guided = torch.add(log_p, param.guidance(direction), out=scratch)
        top = guided.amax(dim=-1, keepdim=True)
        total = guided.sub_(top).exp_().sum(dim=-1, keepdim=True)
        lse = total.log().add_(top).squeeze(-1)
        weights = guided.div_(total)  # softmax(log p + guidance): d lse / d guidance
        scale = param.guidance_grad(direction)
        if scale is not None:
            weights.mul_(scale)
        # maxima within TIE_TOLERANCE (float noise: the cache's log p against the adapted pass) share the gradient
        tied = top_two.shape[-1] > 1 and bool((top_two[:, 0] - top_two[:, 1] <= TIE_TOLERANCE).any())
        argmax = (direction >= (direction_max - TIE_TOLERANCE)[:, None]) if tied else top_index[:, 0]
        _POOL.give_back("merge_direction", buffers.pop("merge_direction"))
        ctx.save_for_backward(following, weight)
        ctx.buffers, ctx.rows = buffers, rows
        ctx.lse_logits, ctx.clamped, ctx.argmax = lse_logits, clamped, argmax
        ctx.mark_non_differentiable(following)
        return lse, direction_max, taken

    @staticmethod
    def backward(ctx, grad_lse, grad_max, grad_taken):
        following, weight = ctx.saved_tensors
        buffers, rows = ctx.buffers, ctx.rows
        lse_logits, clamped, argmax = ctx.lse_logits, ctx.clamped, ctx.argmax
        ctx.buffers = ctx.lse_logits = ctx.clamped = ctx.argmax = None  # consumed: the buffers go back below
        logits, weights = buffers["merge_logits"][:rows], buffers["merge_scratch"][:rows]
        grad_d = weights.mul_(grad_lse[:, None]) if grad_lse is not None else weights.zero_()
        if grad_max is not None:
            if argmax.dim() == 1:
                grad_d.scatter_add_(1, argmax[:, None], grad_max[:, None])
            else:  # amax's gradient is shared among tied maxima (as torch.amax does); common at initialisation
                share = grad_max[:, None] / argmax.sum(-1, keepdim=True, dtype=torch.int32)
                spare = _POOL.take("merge_direction", rows, logits.shape[1], logits.device, logits.dtype)
                grad_d.add_(spare[:rows].copy_(argmax).mul_(share))  # no fresh [M, V] tensor (see above)
                _POOL.give_back("merge_direction", spare)
        if grad_taken is not None:
            grad_d.scatter_add_(1, following[:, None], grad_taken[:, None])
        grad_d.masked_fill_(clamped, 0.0)  # d / d log_pi (a mask, not a product: no float copy of it)
        # through log_softmax: g - softmax(logits) * sum(g)
        softmax = logits.sub_(lse_logits).exp_()
        grad_d.sub_(softmax.mul_(grad_d.sum(dim=-1, keepdim=True)))
        _POOL.give_back("merge_logits", buffers["merge_logits"])
        if weight is None:
            return (
                grad_d,
                None,
                None,
                None,
                None,
            )  # the caller's gradient now: its buffer stays out of the pool
        grad_source = grad_d @ weight
        _POOL.give_back("merge_scratch", buffers["merge_scratch"])
        return grad_source, None, None, None, None


_MERGE_BUFFERS = ("merge_logits", "merge_direction", "merge_scratch")


# ------------------------------------------------------------------------------------------------ the cache
def _rows(samples: SampleSet, index: int) -> int:
    """Tokens of a sample's collated row: prompt + completion, or [decoder start | completion]."""
    first = 1 if samples.decoder_start_token_id is not None else len(samples.prompts[index])
    return first + len(samples.completions[index])


def samples_fingerprint(samples: SampleSet) -> str:
    """A hash of a sample set's token ids (prompts, completions, decoder start): what the cache depends on."""
    digest = hashlib.sha256(str(samples.decoder_start_token_id).encode())
    for rows in (samples.prompts, samples.completions):
        digest.update(torch.tensor([len(r) for r in rows], dtype=torch.int64).numpy().tobytes())
        digest.update(torch.tensor([t for r in rows for t in r], dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


class FeatureCache:
    """The frozen base's last hidden states of every collated row of a SampleSet: [tokens, H] and row offsets
    (for DiNADO-Merge: what its lowest adapted decoder layer reads, that layer's index in ``metadata["layer"]``,
    and, where ``metadata["last_hidden"]``, the base's last hidden states too, so that a training step need not
    run the layers above without the adapter to get log p).

    Built by :func:`precompute_features`; pass it to ``dinado.train(..., cache_features=cache)``, or let
    ``train`` build one. ``save(path)`` / ``FeatureCache.load(path)`` keep it in a safetensors file; a cache
    opened from a file (``in_memory=False``) reads a batch's rows at a time.
    """

    def __init__(
        self,
        hidden: torch.Tensor | None,
        offsets: torch.Tensor,
        metadata: dict[str, Any],
        reader: Any = None,
        last: torch.Tensor | None = None,
        last_reader: Any = None,
    ) -> None:
        self._hidden = hidden
        self._reader = reader  # a safetensors slice of the file's "hidden" when not in memory
        self._last, self._last_reader = last, last_reader  # the same for "last" (Merge caches only)
        self._handle: Any = None
        self.offsets = offsets
        self.metadata = dict(metadata)
        self.metadata["last_hidden"] = last is not None or last_reader is not None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __repr__(self) -> str:
        where = "in memory" if self._hidden is not None else f"in {self.metadata.get('path')}"
        return f"FeatureCache({len(self)} samples, {self.num_tokens} tokens x {self.hidden_size}, {self.dtype}, {where})"

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def hidden_size(self) -> int:
        return int(self.metadata["hidden_size"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.metadata["dtype"])

    @property
    def nbytes(self) -> int:
        blocks = 2 if self.metadata["last_hidden"] else 1
        return blocks * self.num_tokens * self.hidden_size * torch.empty((), dtype=self.dtype).element_size()

    def rows(self, index: int) -> torch.Tensor:
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return self._hidden[a:b] if self._hidden is not None else self._reader[a:b]

    def last_rows(self, index: int) -> torch.Tensor:
        a, b = int(self.offsets[index]), int(self.offsets[index + 1])
        return self._last[a:b] if self._last is not None else self._last_reader[a:b]

    def batch_hidden(self, indices: Sequence[int], length: int, last: bool = False) -> torch.Tensor:
        """[B, length, H] hidden states of ``indices``, right-padded with zeros as ``SampleSet.collate`` pads
        (``last``: the base's last hidden states a Merge cache also holds)."""
        if last and not self.metadata["last_hidden"]:
            raise FeatureCacheError(
                "this cache holds no last hidden states (metadata['last_hidden'] is false)"
            )
        read = self.last_rows if last else self.rows
        out = torch.zeros((len(indices), length, self.hidden_size), dtype=self.dtype)
        for r, i in enumerate(indices):
            rows = read(i)
            out[r, : rows.shape[0]] = rows
        return out

    def subset(self, samples: SampleSet, indices: Sequence[int]) -> FeatureCache:
        """The cache of ``samples.subset(indices)``, in memory (``samples`` is the set this cache was made for:
        checked), so that training on part of a sample set needs no second pass of the base; ``self`` is not
        changed."""
        if self.metadata.get("samples_fingerprint") != samples_fingerprint(samples):
            raise FeatureCacheError(
                "FeatureCache.subset: the cache was computed for another sample set than the one given"
            )
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise IndexError(
                f"FeatureCache.subset: index {bad[0]} is outside the cache's {len(self)} samples"
            )
        lengths = torch.tensor([int(self.offsets[i + 1] - self.offsets[i]) for i in idx], dtype=torch.int64)
        offsets = F.pad(lengths.cumsum(0), (1, 0))
        empty = torch.zeros((0, self.hidden_size), dtype=self.dtype)
        gather = lambda read: torch.cat([read(i) for i in idx]) if idx else empty
        part = samples.subset(idx)
        metadata = {k: v for k, v in self.metadata.items() if k not in ("path", "last_hidden")}
        metadata.update(samples_fingerprint=samples_fingerprint(part), num_samples=len(part))
        last = gather(self.last_rows) if self.metadata["last_hidden"] else None
        return FeatureCache(gather(self.rows), offsets, metadata, last=last)

    def check(self, guide: Guide, samples: SampleSet) -> None:
        """Refuse a cache made for another sample set or another base than ``guide``'s."""
        reason = unsupported_reason(guide)
        if reason is not None:
            raise FeatureCacheError(f"cached features cannot train this guide: {reason}")
        problems = []
        if self.metadata.get("samples_fingerprint") != samples_fingerprint(samples):
            problems.append("it was computed for another sample set")
        recorded, given = self.metadata.get("base_fingerprint"), guide.config.base_fingerprint
        if recorded is not None and given is not None and recorded != given:
            problems.append(
                f"it was computed with another base (weights hash {recorded}, this guide's {given})"
            )
        layer = cache_layer(guide)
        if self.metadata.get("layer") != layer:
            made = self.metadata.get("layer")
            what = lambda i: (
                "the base's last hidden states" if i is None else f"the input of decoder layer {i}"
            )
            problems.append(f"it holds {what(made)}, and this guide needs {what(layer)}")
        if self.hidden_size != guide.config.base_hidden_size:
            problems.append(
                f"its hidden size {self.hidden_size} is not the base's {guide.config.base_hidden_size}"
            )
        if problems:
            raise FeatureCacheError(f"the feature cache does not fit: {'; '.join(problems)}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache as one safetensors file (``hidden``, ``last`` where held, ``offsets``, metadata in its
        header)."""
        with _SafetensorsWriter(
            path, len(self), self.num_tokens, self.hidden_size, self.dtype, self.metadata
        ) as w:
            for i in range(len(self)):
                w.write_rows(int(self.offsets[i]), self.rows(i))
                if self.metadata["last_hidden"]:
                    w.write_rows(int(self.offsets[i]), self.last_rows(i), "last")
            w.write_offsets(self.offsets)

    @classmethod
    def load(cls, path: str | os.PathLike, in_memory: bool = True) -> FeatureCache:
        """Open a saved cache; ``in_memory=False`` leaves the hidden states in the file (read per batch)."""
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt")
        header = handle.metadata() or {}
        if header.get("format") != CACHE_FORMAT:
            raise FeatureCacheError(f"{path} is not a dinado feature cache (format {header.get('format')!r})")
        metadata = json.loads(header["metadata"])
        metadata["path"] = str(path)
        offsets = handle.get_tensor("offsets")
        has_last = bool(metadata.get("last_hidden"))
        if in_memory:
            last = handle.get_tensor("last") if has_last else None
            return cls(handle.get_tensor("hidden"), offsets, metadata, last=last)
        last_reader = handle.get_slice("last") if has_last else None
        cache = cls(None, offsets, metadata, reader=handle.get_slice("hidden"), last_reader=last_reader)
        cache._handle = handle  # the open file the reader reads from
        return cache


class _SafetensorsWriter:
    """Writes a safetensors file a block of rows at a time: the header first (the shapes are known), then the
    rows where they belong, so a cache larger than memory never has to be held whole."""

    def __init__(self, path, num_samples, num_tokens, hidden_size, dtype, metadata) -> None:
        self.path = Path(path)
        self.element = torch.empty((), dtype=dtype).element_size()
        block = num_tokens * hidden_size * self.element
        self.row_bytes = hidden_size * self.element
        offsets_bytes = (num_samples + 1) * 8
        names = ["hidden", "last"] if metadata.get("last_hidden") else ["hidden"]
        self.starts = {name: i * block for i, name in enumerate(names)}  # each [tokens, H] block's offset
        hidden_bytes = len(names) * block
        header: dict[str, Any] = {
            "__metadata__": {"format": CACHE_FORMAT, "metadata": json.dumps(metadata, sort_keys=True)}
        }
        for name, start in self.starts.items():
            header[name] = {
                "dtype": _SAFETENSORS_DTYPES[dtype],
                "shape": [num_tokens, hidden_size],
                "data_offsets": [start, start + block],
            }
        header["offsets"] = {
            "dtype": "I64",
            "shape": [num_samples + 1],
            "data_offsets": [hidden_bytes, hidden_bytes + offsets_bytes],
        }
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.prefix = struct.pack("<Q", len(encoded)) + encoded
        self.data_start = len(self.prefix)
        self.hidden_bytes = hidden_bytes
        self.total = self.data_start + hidden_bytes + offsets_bytes

    def __enter__(self) -> _SafetensorsWriter:
        self._atomic = atomic_file(self.path)
        tmp = self._atomic.__enter__()
        self.file = open(tmp, "wb")
        self.file.write(self.prefix)
        self.file.truncate(self.total)
        return self

    def write_rows(self, first_token: int, rows: torch.Tensor, name: str = "hidden") -> None:
        self.file.seek(self.data_start + self.starts[name] + first_token * self.row_bytes)
        self.file.write(_raw_bytes(rows))

    def write_offsets(self, offsets: torch.Tensor) -> None:
        self.file.seek(self.data_start + self.hidden_bytes)
        self.file.write(_raw_bytes(offsets.to(torch.int64)))

    def __exit__(self, *exc: Any) -> None:
        self.file.close()
        self._atomic.__exit__(*exc)


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """Little-endian raw bytes of a CPU tensor (bfloat16 through its 16-bit pattern)."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


def estimated_bytes(guide: Guide, samples: SampleSet, dtype: torch.dtype | None = None) -> int:
    """The size of the cache of ``samples`` for ``guide``'s base, in ``dtype`` (default: the base's); a Merge
    cache holds two blocks (its layer's input and the last hidden states)."""
    dtype = dtype or next(unwrap_peft(guide.base).parameters()).dtype
    tokens = sum(_rows(samples, i) for i in range(len(samples)))
    blocks = 1 if cache_layer(guide) is None else 2
    return blocks * tokens * guide.config.base_hidden_size * torch.empty((), dtype=dtype).element_size()


def _check_head(
    guide: Guide, hidden: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, layer: int | None = None
) -> None:
    """Refuse a base whose logits lm_head_logits does not reproduce (another head than those it knows), or, with
    ``layer``, whose stack run from that layer on (``hidden``: the result) does not give its own logits."""
    rows = slice(0, 2)  # a couple of rows is enough to tell, and keeps the check cheap at a large vocabulary
    real = mask[rows].bool()
    ours = lm_head_logits(guide.base, hidden[rows])[real].float()
    theirs = logits[rows][real].float()
    scale = 1.0 + theirs.abs().max().item()
    tolerance = 1e-4 if logits.dtype == torch.float32 else 3e-2
    diff = (ours - theirs).abs().max().item()
    if not diff <= tolerance * scale:
        name = type(unwrap_peft(guide.base)).__name__
        how = (
            "recompute log p through the LM head from the cached hidden states"
            if layer is None
            else f"run the decoder layers from {layer} up on cached inputs, then the LM head"
        )
        raise FeatureCacheError(
            f"cached features {how}, but {name} computes its logits otherwise (largest difference "
            f"{diff:.3g}): train it with cache_features=False"
        )


def precompute_features(
    guide: Guide,
    samples: SampleSet,
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
    path: str | os.PathLike | None = None,
    progress: bool = False,
) -> FeatureCache:
    """Run the frozen base once over every sample and keep its last hidden states: a :class:`FeatureCache`.

    Batches of ``batch_size`` rows of similar length (sorted, so little padding), without the LM head where the
    base accepts ``logits_to_keep``. ``dtype`` is the storage type (default: the base's own; bfloat16 or
    float16 halve a float32 base's cache, the loss then sees the rounded states). With ``path`` the cache is
    written to that safetensors file as it is computed and read back from it a batch at a time, so it never has
    to fit in memory. The first batch checks that the LM head reproduces the base's own logits.
    """
    return _precompute([guide], samples, batch_size, dtype, [path], progress)[0]


def precompute_shared_features(
    guides: Sequence[Guide],
    samples: SampleSet,
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[FeatureCache]:
    """One :class:`FeatureCache` per guide from a single pass of the base over ``samples``.

    Guides trained on the same samples from the same base (e.g. DiNADO-Merge, whose cache is the input of its
    lowest adapted layer, beside a module variant, whose cache is the last hidden states) read different states
    of the same forward pass; this runs it once instead of once per guide. Every guide must have been created
    on the same base weights; the caches are in memory (``precompute_features(path=...)`` writes one to disk).
    """
    return _precompute(guides, samples, batch_size, dtype, [None] * len(guides), progress)


def _cache_metadata(guide: Guide, layer: int | None, samples: SampleSet, storage: torch.dtype) -> dict:
    return {
        "layer": layer,
        "samples_fingerprint": samples_fingerprint(samples),
        "base_fingerprint": guide.config.base_fingerprint,
        "hidden_size": guide.config.base_hidden_size,
        "dtype": str(storage).removeprefix("torch."),
        "num_samples": len(samples),
        "last_hidden": layer is not None,
    }


def _check_guides(guides: Sequence[Guide]) -> list[Guide]:
    guides = list(guides)
    if not guides:
        raise ValueError("need at least one guide")
    prints = {g.config.base_fingerprint for g in guides}
    if len(prints) > 1:
        raise FeatureCacheError(
            f"the guides were created on different bases (weights hashes {sorted(map(str, prints))}): one base "
            "pass cannot serve them; call precompute_features for each"
        )
    for guide in guides:
        reason = unsupported_reason(guide)
        if reason is not None:
            raise FeatureCacheError(f"cached features cannot train this guide: {reason}")
    return guides


def recording_plan(
    model: torch.nn.Module, guides: Sequence[Guide], dtype: torch.dtype | None = None
) -> tuple[list[Guide], torch.dtype, dict[int | None, list[torch.Tensor]]]:
    """Before :func:`dinado.sample_with_features` samples: the checked guides, the caches' storage type and the
    empty ``record_states`` dict for :func:`dinado.sample` (the states every guide's cache needs)."""
    from .hf import base_fingerprint

    guides = _check_guides(guides)
    recorded = guides[0].config.base_fingerprint
    if recorded is not None and base_fingerprint(model) != recorded:
        raise FeatureCacheError(
            f"the guides were created on another base (weights hash {recorded}, this model's "
            f"{base_fingerprint(model)}): sample from the model the guides were created on"
        )
    storage = dtype or next(unwrap_peft(model).parameters()).dtype
    if storage not in _SAFETENSORS_DTYPES or not storage.is_floating_point:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {storage}")
    return guides, storage, {key: [] for key in {None, *(cache_layer(g) for g in guides)}}


def caches_from_recorded(
    model: torch.nn.Module,
    guides: list[Guide],
    samples: SampleSet,
    states: dict[int | None, list[torch.Tensor]],
    storage: torch.dtype,
) -> list[FeatureCache]:
    """One :class:`FeatureCache` per guide from the states ``dinado.sample(record_states=states)`` kept (one
    ``[tokens, H]`` tensor per sample and key), checked on the first two samples against a full pass of the
    base. ``states`` is emptied (its tensors are joined into the caches)."""
    lengths = torch.tensor([_rows(samples, i) for i in range(len(samples))], dtype=torch.int64)
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    stores = {}
    for key in list(states):
        stores[key] = torch.cat(states.pop(key)).to(storage)
        if stores[key].shape[0] != int(offsets[-1]):
            raise FeatureCacheError(
                f"the recorded states hold {stores[key].shape[0]} token rows, the samples {int(offsets[-1])}"
            )
    layers = [cache_layer(g) for g in guides]
    caches = [
        FeatureCache(
            stores[layer],
            offsets,
            _cache_metadata(g, layer, samples, storage),
            last=stores[None] if layer is not None else None,
        )
        for g, layer in zip(guides, layers, strict=True)
    ]
    _check_recorded(model, guides, caches, samples)
    return caches


@torch.no_grad()
def _check_recorded(model, guides: list[Guide], caches: list[FeatureCache], samples: SampleSet) -> None:
    """A full pass of the base over the first two samples: the recorded states must be its own (up to rounding),
    and each guide's cached loss path must give the base's logits."""
    part = list(range(min(2, len(samples))))
    batch = samples.collate(part)
    runner = next((g for g in guides if g.module is not None), guides[0])
    kwargs = runner._base_kwargs(batch.input_ids, batch.attention_mask, None, None)
    length = batch.input_ids.shape[1]
    wanted = sorted({cache_layer(g) for g in guides} - {None})
    with ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        last = stack.enter_context(capture_hidden(model))
        inputs = {layer: stack.enter_context(capture_layer_input(model, layer)) for layer in wanted}
        logits = model(**kwargs).logits
        fresh = {layer: seen[-1] for layer, seen in inputs.items()}
        fresh[None] = last.pop()
    real = batch.attention_mask.bool()
    for cache, layer in zip(caches, (cache_layer(g) for g in guides), strict=True):
        for key, kept in ((layer, cache.batch_hidden(part, length)),) + (
            ((None, cache.batch_hidden(part, length, last=True)),) if layer is not None else ()
        ):
            ours, theirs = kept[real].float(), fresh[key][real].float()
            diff = (ours - theirs).abs().max().item()
            tolerance = (1e-3 if cache.dtype == torch.float32 else 3e-2) * (1.0 + theirs.abs().max().item())
            if not diff <= tolerance:
                where = "the last hidden states" if key is None else f"the input of decoder layer {key}"
                raise FeatureCacheError(
                    f"the states recorded while sampling differ from a full pass of the base ({where}, largest "
                    f"difference {diff:.3g}): build the caches with precompute_shared_features instead"
                )
    for guide, cache, layer in zip(guides, caches, (cache_layer(g) for g in guides), strict=True):
        hidden = cache.batch_hidden(part, length).to(logits.dtype)
        _check_cache_head(guide, layer, hidden, kwargs, logits, batch.attention_mask)


@torch.no_grad()
def _precompute(guides, samples, batch_size, dtype, paths, progress) -> list[FeatureCache]:
    guides = _check_guides(guides)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    # the frozen base itself where a module guide holds it: a Merge guide's adapted copy reads the same input at
    # its lowest adapted layer, and its last hidden states would include the adapter
    runner = next((g for g in guides if g.module is not None), guides[0])
    base = runner.base
    storage = dtype or next(unwrap_peft(base).parameters()).dtype
    if storage not in _SAFETENSORS_DTYPES or not storage.is_floating_point:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {storage}")
    lengths = torch.tensor([_rows(samples, i) for i in range(len(samples))], dtype=torch.int64)
    offsets = F.pad(lengths.cumsum(0), (1, 0))
    hidden_size = runner.config.base_hidden_size
    layers = [cache_layer(g) for g in guides]
    # what each guide's cache holds: a module guide the last hidden states (None); a Merge guide the input of its
    # lowest adapted layer and the last hidden states (log p without running the layers above a second time)
    holds = [[None] if layer is None else [layer, None] for layer in layers]
    metadatas = [_cache_metadata(g, layer, samples, storage) for g, layer in zip(guides, layers, strict=True)]
    num_tokens = int(offsets[-1])
    keep_logits = "logits_to_keep" in _forward_parameters(base)
    order = sorted(range(len(samples)), key=lambda i: (int(lengths[i]), i))
    device = runner.device
    shared = {  # one in-memory store per kind of states: guides reading the same states share it
        key: torch.empty((num_tokens, hidden_size), dtype=storage)
        for keys, path in zip(holds, paths, strict=True)
        if path is None
        for key in keys
    }
    wanted = sorted({layer for layer in layers if layer is not None})
    with ExitStack() as stack:
        writers = []
        for path, metadata in zip(paths, metadatas, strict=True):
            if path is None:
                writers.append(None)
                continue
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            writers.append(
                stack.enter_context(
                    _SafetensorsWriter(path, len(samples), num_tokens, hidden_size, storage, metadata)
                )
            )
        stack.enter_context(eval_mode(base))
        if runner.module is None and hasattr(base, "disable_adapter"):
            stack.enter_context(base.disable_adapter())  # the frozen base's logits, for the checks
        bar = stack.enter_context(tqdm(total=len(samples), desc="cache features", disable=not progress))
        last = stack.enter_context(capture_hidden(base))
        inputs = {layer: stack.enter_context(capture_layer_input(base, layer)) for layer in wanted}
        for n, start in enumerate(range(0, len(order), batch_size)):
            part = order[start : start + batch_size]
            batch = samples.collate(part).to(device)
            kwargs = runner._base_kwargs(
                batch.input_ids, batch.attention_mask, batch.encoder_input_ids, batch.encoder_attention_mask
            )
            if keep_logits and n > 0:
                kwargs["logits_to_keep"] = 1  # the LM head is recomputed at training time, where needed
            logits = base(**kwargs).logits
            states = {layer: seen[-1] for layer, seen in inputs.items()}
            states[None] = last.pop()
            if n == 0:
                for guide, layer in zip(guides, layers, strict=True):
                    _check_cache_head(guide, layer, states[layer], kwargs, logits, batch.attention_mask)
                last.parts.clear()  # what the checks' own passes left in the hooks
            for seen in inputs.values():
                seen.clear()
            for layer in states:
                states[layer] = states[layer].to("cpu", storage)
            targets = [(key, store, None) for key, store in shared.items()]
            for keys, writer in zip(holds, writers, strict=True):
                if writer is not None:
                    targets += [(key, writer, "hidden" if k == 0 else "last") for k, key in enumerate(keys)]
            for key, target, name in targets:
                hidden = states[key]
                for r, i in enumerate(part):
                    rows = hidden[r, : int(lengths[i])]
                    if name is None:
                        target[int(offsets[i]) : int(offsets[i + 1])] = rows
                    else:
                        target.write_rows(int(offsets[i]), rows, name)
            bar.update(len(part))
        for writer in writers:
            if writer is not None:
                writer.write_offsets(offsets)
    return [
        FeatureCache.load(path, in_memory=False)
        if path is not None
        else FeatureCache(shared[keys[0]], offsets, metadata, last=shared[None] if len(keys) > 1 else None)
        for path, keys, metadata in zip(paths, holds, metadatas, strict=True)
    ]


def _check_cache_head(guide: Guide, layer: int | None, hidden, kwargs: dict, logits, mask) -> None:
    """The first batch's check that ``guide``'s loss, computed from ``hidden`` (its cached states), gives the
    base's own ``logits``: through the LM head, or (``layer``) the stack from that layer up then the LM head."""
    if layer is None:
        _check_head(guide, hidden, logits, mask)
        return
    base = guide.base
    with ExitStack() as stack:
        if guide.module is None and hasattr(base, "disable_adapter"):
            stack.enter_context(base.disable_adapter())  # the base's logits are those without the adapter
        stack.enter_context(start_at_layer(base, layer, hidden))
        cap = stack.enter_context(capture_hidden(base))
        keep = "logits_to_keep" in _forward_parameters(base)
        base(**{**kwargs, "logits_to_keep": 1} if keep else kwargs)
    _check_head(guide, cap.pop(), logits, mask, layer)


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(unwrap_peft(model).forward).parameters)


def default_memory_budget() -> int:
    """The largest cache ``train`` builds in memory by itself: a quarter of the machine's memory, at most 8 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return int(min(8 << 30, total // 4))
