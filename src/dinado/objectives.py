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

from .numerics import bernoulli_cross_entropy, bernoulli_kl


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    completion_mask: torch.Tensor  # [B, L] 1 on completion tokens
    terminal_mask: torch.Tensor  # [B, L] 1 on the terminal completion token (EOS or last at the cap)
    labels: torch.Tensor  # [B] oracle values in [0, 1]
    weights: torch.Tensor  # [B] importance weights (1 for samples from p)
    # encoder-decoder bases: the source, right-padded; input_ids are then the decoder rows [start | completion]
    encoder_input_ids: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device) if v is not None else None for k, v in self.__dict__.items()})


@dataclass
class LossTerms:
    loss: torch.Tensor  # what is differentiated: ce + weight * regularizer
    cross_entropy: torch.Tensor
    regularizer: torch.Tensor
    ce_count: int
    reg_count: int


def prefix_log_values(log_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log R(x_<=t) for t = 1..L-1, gathered from the previous position: [B, L - 1]."""
    return log_values[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def guide_loss(
    guide, batch: Batch, regularizer_weight: float | None = None, ce_positions: str | None = None
) -> LossTerms:
    """Loss of ``guide`` on ``batch`` (per-term sums of weighted terms over the count of terms)."""
    cfg = guide.config
    weight = cfg.effective_regularizer_weight if regularizer_weight is None else regularizer_weight
    positions = ce_positions or cfg.ce_positions
    out = guide(batch.input_ids, batch.attention_mask, batch.encoder_input_ids, batch.encoder_attention_mask)
    log_values, log_root = guide.parameterization.log_values(
        out.log_p, out.direction, out.norm, batch.input_ids, batch.completion_mask
    )
    log_r = prefix_log_values(log_values, batch.input_ids)  # [B, L-1], value of x_<=t at index t-1
    comp = batch.completion_mask[:, 1:].to(log_r.dtype)
    term = batch.terminal_mask[:, 1:].to(log_r.dtype)
    ce_mask = comp if positions == "all" else term
    labels = batch.labels.to(log_r.dtype)[:, None]
    w = batch.weights.to(log_r.dtype)[:, None]
    ce_sum = (w * ce_mask * bernoulli_cross_entropy(log_r, labels)).sum()
    ce_count = ce_mask.sum()
    if log_root is not None:
        ce_sum = ce_sum + (batch.weights * bernoulli_cross_entropy(log_root, batch.labels)).sum()
        ce_count = ce_count + log_root.shape[0]
    cross_entropy = ce_sum / ce_count.clamp(min=1)

    reg_mask = comp * (1.0 - term)  # transitions into non-terminal prefixes
    if weight > 0 and reg_mask.sum() > 0:
        # S(x_<=t) = sum_v p(v | x_<=t) R(x_<=t + v), at positions t = 1..L-1
        log_s = torch.logsumexp(out.log_p[:, 1:] + log_values[:, 1:], dim=-1)
        kl = bernoulli_kl(log_s, log_r)
        regularizer = (w * reg_mask * kl).sum() / reg_mask.sum()
    else:
        regularizer = log_r.new_zeros(())
    return LossTerms(
        loss=cross_entropy + weight * regularizer,
        cross_entropy=cross_entropy,
        regularizer=regularizer,
        ce_count=int(ce_count.item()),
        reg_count=int(reg_mask.sum().item()),
    )
