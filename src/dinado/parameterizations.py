"""How log R and log q come out of a guide's raw outputs: one small class per family.

Every guide produces, at each position t that has read x_<=t:
    log_p[t, v]      the frozen base model's log p(v | x_<=t)                      [B, L, V]
    direction[t, v]  token-level logits: NADO's sigmoid logits s, DiNADO's d        [B, L, V]
    norm[t]          DiNADO's norm logit n (log N = logsigmoid(n)), None for NADO   [B, L]
A parameterisation turns these into the decoding distribution log q and the values
log R(x_<=t + v). The objectives, the trainer and the decoder never look at the variant's name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Parameterization:
    """Base class: decoding distribution and next-token values from raw outputs."""

    def guidance(self, direction: torch.Tensor) -> torch.Tensor:
        """The term added to log p before renormalising (alpha = 1 is the method)."""
        raise NotImplementedError

    def log_q(self, log_p: torch.Tensor, direction: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """log q_theta(v | .) = log_softmax(log p + alpha * guidance)."""
        return F.log_softmax(log_p + alpha * self.guidance(direction), dim=-1)

    def log_values(
        self,
        log_p: torch.Tensor,
        direction: torch.Tensor,
        norm: torch.Tensor | None,
        input_ids: torch.Tensor,
        completion_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (log R(x_<=t + v) as [B, L, V], log R(c) at the root as [B] or None)."""
        raise NotImplementedError


class NADOParameterization(Parameterization):
    """NADO: one independent sigmoid per next token, R(x_<=t + v) = sigmoid(s_v)."""

    def guidance(self, direction: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(direction)

    def log_values(self, log_p, direction, norm, input_ids, completion_mask):
        return F.logsigmoid(direction), None


class DiNADOParameterization(Parameterization):
    """DiNADO: R(x_<t + v) = N(x_<t) * D(v | x_<t), log D = d - max_v d, log N = logsigmoid(n).

    consistency="soft": N is predicted at every position (trained with the regulariser).
    consistency="hard": only the root value R(c) = sigmoid(n at the last prompt position) is learned and the
    Bellman equation carries it forward: R(x_<=t + v) = R(c) * q(x_<=t + v) / p(x_<=t + v).
    """

    def __init__(self, consistency: str) -> None:
        if consistency not in ("soft", "hard"):
            raise ValueError(f"consistency must be 'soft' or 'hard', got {consistency!r}")
        self.consistency = consistency

    def guidance(self, direction: torch.Tensor) -> torch.Tensor:
        return direction

    def log_values(self, log_p, direction, norm, input_ids, completion_mask):
        if norm is None:
            raise ValueError("DiNADO needs a norm head output")
        if self.consistency == "soft":
            log_d = direction - direction.amax(dim=-1, keepdim=True)
            return F.logsigmoid(norm).unsqueeze(-1) + log_d, None
        # Hard: log q(v|t) - log p(v|t) = d_v - logsumexp_v'(log p + d) exactly, no clamped subtraction needed.
        log_ratio = direction - torch.logsumexp(log_p + direction, dim=-1, keepdim=True)  # [B, L, V]
        taken = log_ratio[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # ratio of x_t, t >= 1
        taken = taken * completion_mask[:, 1:].to(taken.dtype)
        cumulative = F.pad(taken.cumsum(dim=1), (1, 0))  # [B, L]: log q/p of the completion up to t
        root_pos = (completion_mask.long().argmax(dim=1) - 1).clamp(min=0)  # last prompt position
        log_root = F.logsigmoid(norm.gather(1, root_pos[:, None])).squeeze(1)  # [B]
        return log_root[:, None, None] + cumulative.unsqueeze(-1) + log_ratio, log_root


def parameterization_for(variant: str, consistency: str) -> Parameterization:
    if variant == "nado":
        return NADOParameterization()
    return DiNADOParameterization(consistency)
