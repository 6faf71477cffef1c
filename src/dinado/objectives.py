"""Training objectives shared by every variant: cross-entropy on prefix values and the consistency regulariser.

Indexing: position t has read x_<=t. The value of the prefix x_<=t (t a completion position) is
log R(x_<=t) = log_values[t - 1, x_t], where log_values[t, v] = log R(x_<=t + v) comes from the
parameterisation. A batch is right-padded [prompt | completion | pad] (for an encoder-decoder base,
[decoder start | completion | pad] with the prompt in the encoder fields); masks, not token ids, say where
the completion and its terminal token are, so an EOS inside the prompt or an EOS used as pad is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import Batch, SampleSet
from .features import cached_position_stats
from .hf import eval_mode
from .numerics import bernoulli_cross_entropy, bernoulli_kl


@dataclass
class LossTerms:
    loss: torch.Tensor  # what is differentiated: ce + weight * regularizer
    cross_entropy: torch.Tensor
    regularizer: torch.Tensor
    ce_count: int  # the terms of this batch (the loss divides by the normaliser's counts when one is given)
    reg_count: int


def prefix_log_values(log_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log R(x_<=t) for t = 1..L-1, gathered from the previous position: [B, L - 1]."""
    return log_values[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def _masks(batch: Batch, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy mask, regulariser mask), each [B, L - 1] at index t - 1 for the prefix x_<=t."""
    comp = batch.completion_mask[:, 1:].float()
    term = batch.terminal_mask[:, 1:].float()
    ce_mask = comp if positions == "all" else term
    return ce_mask, comp * (1.0 - term)  # the regulariser: transitions into non-terminal prefixes


def term_counts(guide, batch: Batch, ce_positions: str | None = None) -> tuple[int, int]:
    """(cross-entropy terms, regulariser terms) of ``batch``, from its masks alone (no forward pass).

    The loss is a mean over terms, so a batch split into micro-batches divides each chunk's sums by the whole
    batch's counts (``guide_loss(..., normalizer=...)``) and gives the same loss and gradient as one pass.
    """
    ce_mask, reg_mask = _masks(batch, ce_positions or guide.config.ce_positions)
    roots = batch.input_ids.shape[0] if guide.parameterization.has_root else 0
    return int(ce_mask.sum().item()) + roots, int(reg_mask.sum().item())


def guide_loss(
    guide,
    batch: Batch,
    regularizer_weight: float | None = None,
    ce_positions: str | None = None,
    normalizer: tuple[int, int] | None = None,
) -> LossTerms:
    """Loss of ``guide`` on ``batch``: weighted sums of the terms over the count of terms, in float32.

    ``normalizer=(ce_terms, reg_terms)`` divides by those counts instead of this batch's own (a micro-batch
    of a larger batch: see :func:`term_counts`). With ``batch.base_hidden`` set (cached features), the frozen base
    is not run: the module reads the cached hidden states and log p comes through the LM head, one chunk of
    rows at a time (:func:`dinado.features.cached_position_stats`); otherwise the guide runs in full.
    """
    cfg = guide.config
    weight = cfg.effective_regularizer_weight if regularizer_weight is None else regularizer_weight
    positions = ce_positions or cfg.ce_positions
    if batch.base_hidden is not None:
        stats = cached_position_stats(guide, batch, positions, weight > 0)
    else:
        out = guide(
            batch.input_ids, batch.attention_mask, batch.encoder_input_ids, batch.encoder_attention_mask
        )
        stats = guide.parameterization.position_stats(out.log_p, out.direction, out.norm, batch.input_ids)
    # log R(x_<=t) and log S(x_<=t) at index t - 1, float32
    log_r, log_s, log_root = guide.parameterization.prefix_log_values(
        stats, batch.input_ids, batch.completion_mask
    )
    ce_mask, reg_mask = _masks(batch, positions)
    ce_count, reg_count = term_counts(guide, batch, positions)
    ce_total, reg_total = normalizer if normalizer is not None else (ce_count, reg_count)
    labels = batch.labels.float()
    w = batch.weights.float()
    ce_sum = (w[:, None] * ce_mask * bernoulli_cross_entropy(log_r, labels[:, None])).sum()
    if log_root is not None:
        ce_sum = ce_sum + (w * bernoulli_cross_entropy(log_root, labels)).sum()
    cross_entropy = ce_sum / max(ce_total, 1)
    if weight > 0 and reg_count > 0:
        kl = bernoulli_kl(log_s, log_r)  # KL(Bern(S(x_<=t)) || Bern(R(x_<=t)))
        regularizer = (w[:, None] * reg_mask * kl).sum() / reg_total
    else:
        regularizer = log_r.new_zeros(())
    return LossTerms(
        loss=cross_entropy + weight * regularizer,
        cross_entropy=cross_entropy,
        regularizer=regularizer,
        ce_count=ce_count,
        reg_count=reg_count,
    )


def full_vocabulary_loss(guide, batch: Batch, regularizer_weight: float | None = None) -> torch.Tensor:
    """The loss straight from the [B, L, V] values of :meth:`Parameterization.log_values`: a reference.

    This is how the loss was computed before :func:`guide_loss` read only position statistics (several [B, L, V]
    tensors per step, the base run every step); tests check :func:`guide_loss` against it and
    ``benchmarks/train_speed.py`` times it as the path before the cache.
    """
    cfg = guide.config
    weight = cfg.effective_regularizer_weight if regularizer_weight is None else regularizer_weight
    out = guide(batch.input_ids, batch.attention_mask, batch.encoder_input_ids, batch.encoder_attention_mask)
    norm = out.norm.float() if out.norm is not None else None
    log_values, log_root = guide.parameterization.log_values(
        out.log_p, out.direction.float(), norm, batch.input_ids, batch.completion_mask
    )
    log_r = prefix_log_values(log_values, batch.input_ids)
    ce_mask, reg_mask = _masks(batch, cfg.ce_positions)
    labels, w = batch.labels.float(), batch.weights.float()
    ce_sum = (w[:, None] * ce_mask * bernoulli_cross_entropy(log_r, labels[:, None])).sum()
    ce_count = ce_mask.sum()
    if log_root is not None:
        ce_sum = ce_sum + (w * bernoulli_cross_entropy(log_root, labels)).sum()
        ce_count = ce_count + log_root.shape[0]
    loss = ce_sum / ce_count.clamp(min=1)
    if weight > 0 and reg_mask.sum() > 0:
        log_s = torch.logsumexp(out.log_p[:, 1:] + log_values[:, 1:], dim=-1)
        loss = loss + weight * (w[:, None] * reg_mask * bernoulli_kl(log_s, log_r)).sum() / reg_mask.sum()
    return loss


def sequence_log_values(guide, samples: SampleSet, batch_size: int = 16) -> torch.Tensor:
    """log R_theta(x) of each sample's whole completion: the guide's value at its last prefix, [N] float32.

    That is the guide's own estimate of the oracle's verdict on the completion as it stands (the value its
    training fits to the label at the terminal prefix), read with no oracle call. Each batch of ``batch_size``
    samples runs the guide once over prompt and completion; its [batch, length, vocabulary] tensors are what the
    batch size bounds."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    device = next(guide.base.parameters()).device
    out: list[torch.Tensor] = []
    with torch.no_grad(), eval_mode(guide):
        for start in range(0, len(samples), batch_size):
            batch = samples.collate(list(range(start, min(start + batch_size, len(samples)))))
            ids = batch.input_ids.to(device)
            encoder = batch.encoder_input_ids
            raw = guide(
                ids,
                batch.attention_mask.to(device),
                encoder.to(device) if encoder is not None else None,
                batch.encoder_attention_mask.to(device) if encoder is not None else None,
            )
            log_values, _ = guide.parameterization.log_values(
                raw.log_p, raw.direction, raw.norm, ids, batch.completion_mask.to(device)
            )
            terminal = batch.terminal_mask[:, 1:].bool().to(device)
            out.append(prefix_log_values(log_values, ids)[terminal].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
