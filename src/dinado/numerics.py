"""Log-space helpers shared by the objectives and the parameterisations."""

from __future__ import annotations

import math

import torch

LOG_FLOOR = -70.0  # log-probabilities are clamped here before they are subtracted (method.md §5)
LOG_CEIL = -1e-6  # log-values are kept strictly below 0 so that log(1 - R) stays finite
# DiNADO-Merge's cached training: direction values this close to their row's maximum count as tied for the max's
# gradient (shared among them, as torch.amax shares exact ties). There log p is read from the cache and the adapted
# model runs only the top layers, so at initialisation, where every direction is 0, the direction holds float32
# noise instead (up to 3e-5, mean 4e-7 on SmolLM2): without this the max's whole gradient went to one arbitrary
# token per row, the first Adam steps followed it, and the guides came out worse (docs/results/commongen.md).
TIE_TOLERANCE = 1e-4
_LN_HALF = -math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate in both tails (Mächler's two-branch form)."""
    x = x.clamp(max=LOG_CEIL)
    return torch.where(x > _LN_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def bernoulli_cross_entropy(log_r: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """-[C log R + (1 - C) log(1 - R)] with R given as log R <= 0 and C in [0, 1].

    A value past the ceiling (log R > LOG_CEIL, i.e. R >= 1) is scored at the ceiling plus its distance beyond it.
    Only Hard consistency (DiNADO-Hard, Merge with consistency="hard") can overshoot: there R(x_<=t) = R(c) *
    q(x_<=t) / p(x_<=t) and nothing bounds it by 1. A plain clamp would give such a term zero gradient, so a
    negative sample would get no signal from the very prefixes that are most wrong. The added term is linear in
    log R with slope 1 (a restoring force of the size of the positive-label gradient): the loss is unchanged
    inside the range, continuous at the ceiling, and grows past it, so its gradient pushes log R back below 0
    whatever the label. (A straight-through clamp would instead push a positive label's value further out, and
    a negative one's with a gradient of about 1/(1 - R) ~ 1e6; a smooth bound such as logsigmoid would change
    the values inside the range, i.e. the method.)
    """
    inside = log_r.clamp(max=LOG_CEIL)
    cross_entropy = -(label * inside + (1.0 - label) * log1mexp(inside))
    return cross_entropy + (log_r - LOG_CEIL).clamp(min=0.0)


def bernoulli_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(Bern(a) || Bern(b)) from log a and log b."""
    log_a = log_a.clamp(max=LOG_CEIL)
    log_b = log_b.clamp(max=LOG_CEIL)
    log_1a, log_1b = log1mexp(log_a), log1mexp(log_b)
    return log_a.exp() * (log_a - log_b) + log_1a.exp() * (log_1a - log_1b)
