"""How log R and log q come out of a guide's raw outputs: one small class per family.

Every guide produces, at each position t that has read x_<=t:
    log_p[t, v]      the frozen base model's log p(v | x_<=t)                      [B, L, V]
    direction[t, v]  token-level logits: NADO's sigmoid logits s, DiNADO's d        [B, L, V]
    norm[t]          DiNADO's norm logit n (log N = logsigmoid(n)), None for NADO   [B, L]
A parameterisation turns these into the decoding distribution log q and the values
log R(x_<=t + v). The objectives, the trainer and the decoder never look at the variant's name.

The training objective needs far less than the full [B, L, V] values: per position, one log-normaliser over the
vocabulary, the direction at the next token and (Soft) the direction's maximum (:class:`PositionStats`);
:meth:`Parameterization.prefix_log_values` turns those into the prefix values the loss reads. The cached
training path (features.py) computes them a chunk of rows at a time without ever holding [B, L, V].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def row_max(x: torch.Tensor) -> torch.Tensor:
    """``x.amax(dim=-1)`` with amax's gradient (shared among tied maxima), but through ``max``'s single-index
    backward when every row's maximum is unique: amax's backward compares every element with the maximum, which
    over a [rows, 49k] vocabulary costs ~20x its forward on CPU."""
    if x.shape[-1] > 1 and x.requires_grad:
        top_two = x.detach().topk(2, dim=-1).values
        if not bool((top_two[..., 0] == top_two[..., 1]).any()):
            return x.max(dim=-1).values
    return x.amax(dim=-1)


@dataclass
class PositionStats:
    """What the training objective reads of the full-vocabulary outputs, per position t (having read x_<=t).

    Every field is float32. Entries at positions the loss masks out may hold anything finite.
    """

    guided_lse: torch.Tensor  # [B, L] logsumexp_v(log p(v | x_<=t) + guidance(direction)_v)
    direction_max: torch.Tensor | None  # [B, L] max_v direction_v (DiNADO-Soft), else None
    taken: torch.Tensor  # [B, L - 1] direction at the next token: direction[t, x_{t+1}]
    norm: torch.Tensor | None  # [B, L] DiNADO's norm logit, None for NADO


class Parameterization:
    """Base class: decoding distribution and next-token values from raw outputs."""

    needs_direction_max = False  # whether prefix_log_values reads PositionStats.direction_max
    has_root = False  # whether the loss has a cross-entropy term at the root value R(c), one per sample

    def position_stats(
        self,
        log_p: torch.Tensor,
        direction: torch.Tensor,
        norm: torch.Tensor | None,
        input_ids: torch.Tensor,
    ) -> PositionStats:
        """The statistics of full [B, L, V] outputs that the objective reads, in float32."""
        log_p, direction = log_p.float(), direction.float()
        return PositionStats(
            guided_lse=torch.logsumexp(log_p + self.guidance(direction), dim=-1),
            direction_max=row_max(direction) if self.needs_direction_max else None,
            taken=direction[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1),
            norm=norm.float() if norm is not None else None,
        )

    def guidance_grad(self, direction: torch.Tensor) -> torch.Tensor | None:
        """d guidance / d direction, elementwise; None when the guidance is the direction itself."""
        return None

    def vocabulary_rows(
        self,
        next_completion: torch.Tensor,
        next_cross_entropy: torch.Tensor,
        regularized: torch.Tensor,
        with_regularizer: bool,
    ) -> torch.Tensor:
        """The positions [B, L] (bool) at which :meth:`prefix_log_values` reads ``guided_lse`` or
        ``direction_max`` under the loss's masks; elsewhere those may hold anything finite.

        ``next_completion[t]``: x_{t+1} is a completion token; ``next_cross_entropy[t]``: the prefix x_<=t+1 has a
        cross-entropy term; ``regularized[t]``: the prefix x_<=t has a regulariser term.
        """
        raise NotImplementedError

    def prefix_log_values(
        self, stats: PositionStats, input_ids: torch.Tensor, completion_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log R(x_<=t), log S(x_<=t), log R(c)) from position statistics.

        ``log R(x_<=t) = log_values[t - 1, x_t]`` and ``log S(x_<=t) = logsumexp_v(log p(v | x_<=t) +
        log_values[t, v])``, both [B, L - 1] at index t - 1, as :meth:`log_values` would give them; the root
        value [B] or None.
        """
        raise NotImplementedError

    def guidance(self, direction: torch.Tensor) -> torch.Tensor:
        """The term added to log p before renormalising (alpha = 1 is the method)."""
        raise NotImplementedError

    def log_q(self, log_p: torch.Tensor, direction: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """log q_theta(v | .) = log_softmax(log p + alpha * guidance).

        ``log_p`` may be the base's logits instead (any shift per row): the softmax renormalises. One [..., V]
        temporary besides the result, for DiNADO none (decoding is memory-bound on a large vocabulary).
        """
        return F.log_softmax(torch.add(log_p, self.guidance(direction), alpha=alpha), dim=-1)

    def candidate_log_q(
        self,
        log_p: torch.Tensor,  # [..., V]
        candidates: torch.Tensor,  # [..., n] token ids (see candidate_set; repeats allowed)
        direction: torch.Tensor,  # [..., n] the direction at those tokens
        alpha: float = 1.0,
    ) -> torch.Tensor:
        """log q_K(v | .): candidate-restricted guidance, an approximation of :meth:`log_q` (not in the papers).

        On the candidate set K the guidance is the guide's own, alpha * g(d_v); every other token keeps the
        guidance of a zero direction, alpha * g(0), the value a zero-initialised head starts from and keeps for
        tokens it learned nothing about. So q_K = q_theta exactly when the direction is 0 off K, and the direction
        is needed on K only, which is what makes it cheap on a large vocabulary. (Giving the other tokens the
        candidates' mean boost instead was measured and is worse: the one keyword the guide raises inflates the
        mean, and the whole tail with it; docs/benchmarks.md.) NADO, which has no neutral direction, overrides
        this (:meth:`NADOParameterization.candidate_log_q`).
        """
        # the tail's alpha * g(0) is one shift of every token: adding it to K's boost instead is the same softmax
        boost = alpha * (self.guidance(direction) - self.guidance(direction.new_zeros(())))
        scores = log_p.scatter(-1, candidates, log_p.gather(-1, candidates) + boost)
        return F.log_softmax(scores, dim=-1)


def candidate_set(
    log_p: torch.Tensor,  # [..., V]
    k: int,
    token_ids: torch.Tensor,  # [..., L] the tokens of the sequence so far
    present: torch.Tensor,  # [..., L] bool: which of them count (causal, not padding)
) -> torch.Tensor:
    """The candidates of ``candidates=k``: p's top-k tokens and every token present in the sequence so far.

    The sequence's own tokens are there for lexical constraints: the word the oracle wants is often one p ranks
    low but the prompt names, and the pointer can only raise tokens that are candidates. Returns ids [..., k + L];
    absent positions stand as copies of p's top token (a token may be listed more than once).
    """
    top = log_p.topk(min(k, log_p.shape[-1]), dim=-1).indices
    return torch.cat([top, torch.where(present.bool(), token_ids, top[..., :1])], dim=-1)

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

    def guidance_grad(self, direction: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-direction)

    def vocabulary_rows(self, next_completion, next_cross_entropy, regularized, with_regularizer):
        return regularized if with_regularizer else torch.zeros_like(regularized)  # S only

    def prefix_log_values(self, stats, input_ids, completion_mask):
        # R(x_<=t + v) = sigmoid(s_v): S(x_<=t) = sum_v p(v) sigmoid(s_v) is the guided normaliser itself
        return F.logsigmoid(stats.taken), stats.guided_lse[:, 1:], None

    def candidate_log_q(self, log_p, candidates, direction, alpha=1.0):
        """log q_K for NADO: the candidates share p's mass on K in proportion to p * R^alpha; every other token
        keeps p's own probability.

        NADO has no neutral direction (its guidance is log R, and a zero logit means R = 1/2, above what a
        trained head gives most tokens: sending that to the tail moved SmolLM2's samples into p's tail,
        docs/results/commongen.md). Giving the tail the candidates' p-weighted mean of R^alpha instead is the
        same as saying "a token the guide was not asked about leaves the odds of success unchanged": the guide
        only redistributes mass among the candidates. With every token a candidate this is log q_theta.
        """
        guided = log_p.gather(-1, candidates) + alpha * self.guidance(direction)  # [..., n]
        on_k = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, candidates, True)  # repeats count once
        k_scores = torch.full_like(log_p, float("-inf")).scatter(-1, candidates, guided)
        # log E_{p restricted to K}[R^alpha]: the tail's shift, so that K keeps its mass sum_K p
        k_mass = log_p.masked_fill(~on_k, float("-inf")).logsumexp(-1, keepdim=True)
        tail = k_scores.logsumexp(-1, keepdim=True) - k_mass
        return F.log_softmax(torch.where(on_k, k_scores, log_p + tail), dim=-1)


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
        self.needs_direction_max = consistency == "soft"
        self.has_root = consistency == "hard"

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

    def vocabulary_rows(self, next_completion, next_cross_entropy, regularized, with_regularizer):
        if self.consistency == "hard":  # the ratio q/p of every completion token enters the values
            return next_completion
        if not with_regularizer:
            return next_cross_entropy
        # the regulariser compares S(x_<=t) (read at t) with R(x_<=t) (read at t - 1)
        return next_cross_entropy | regularized | F.pad(regularized[:, 1:], (0, 1))

    def prefix_log_values(self, stats, input_ids, completion_mask):
        if stats.norm is None:
            raise ValueError("DiNADO needs a norm head output")
        if self.consistency == "soft":
            # log R(x_<t + v) = log N(x_<t) + d_v - max d; S(x_<=t) = N(x_<=t) * sum_v p(v) D(v)
            log_n = F.logsigmoid(stats.norm)
            log_r = log_n[:, :-1] + stats.taken - stats.direction_max[:, :-1]
            log_s = log_n[:, 1:] - stats.direction_max[:, 1:] + stats.guided_lse[:, 1:]
            return log_r, log_s, None
        # Hard: log q/p of the next token at t is d[t, x_{t+1}] - logsumexp_v(log p + d), exactly
        ratio = stats.taken - stats.guided_lse[:, :-1]  # [B, L-1]
        cumulative = F.pad((ratio * completion_mask[:, 1:].to(ratio.dtype)).cumsum(dim=1), (1, 0))  # [B, L]
        root_pos = (completion_mask.long().argmax(dim=1) - 1).clamp(min=0)  # last prompt position
        log_root = F.logsigmoid(stats.norm.gather(1, root_pos[:, None])).squeeze(1)  # [B]
        log_r = log_root[:, None] + cumulative[:, :-1] + ratio
        # sum_v p(v) R(x_<=t + v) = R(c) * prod q/p up to t * sum_v q(v): the Bellman equation holds exactly
        log_s = log_root[:, None] + cumulative[:, 1:]
        return log_r, log_s, log_root


def parameterization_for(variant: str, consistency: str) -> Parameterization:
    if variant == "nado":
        return NADOParameterization()
    return DiNADOParameterization(consistency)
