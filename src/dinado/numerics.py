"""Log-space helpers shared by the objectives and the parameterisations."""

from __future__ import annotations

import math

import torch

LOG_FLOOR = -70.0  # log-probabilities are clamped here before they are subtracted (method.md §5)
LOG_CEIL = -1e-6  # log-values are kept strictly below 0 so that log(1 - R) stays finite
_LN_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate in both tails (Mächler's two-branch form)."""
    x = x.clamp(max=LOG_CEIL)
    return torch.where(x > _LN_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def bernoulli_cross_entropy(log_r: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """-[C log R + (1 - C) log(1 - R)] with R given as log R <= 0 and C in [0, 1]."""
    log_r = log_r.clamp(max=LOG_CEIL)
    return -(label * log_r + (1.0 - label) * log1mexp(log_r))


def bernoulli_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(Bern(a) || Bern(b)) from log a and log b."""
    log_a = log_a.clamp(max=LOG_CEIL)
    log_b = log_b.clamp(max=LOG_CEIL)
    log_1a, log_1b = log1mexp(log_a), log1mexp(log_b)
    return log_a.exp() * (log_a - log_b) + log_1a.exp() * (log_1a - log_1b)
