import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dinado import parameterizations
from dinado.numerics import bernoulli_cross_entropy, bernoulli_kl, log1mexp


@given(st.floats(min_value=-700.0, max_value=-1e-5))
def test_log1mexp_matches_high_precision_reference(x):
    got = float(log1mexp(torch.tensor(x, dtype=torch.float64)))
    want = math.log(-math.expm1(x))
    assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12)


def test_log1mexp_is_finite_with_finite_gradients_near_zero_and_in_the_tail():
    x = torch.tensor([-1e-9, -1e-6, -0.5, -30.0, -100.0], requires_grad=True)
    y = log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


@given(st.floats(0.001, 0.999), st.floats(0.001, 0.999))
def test_bernoulli_kl_matches_definition(a, b):
    want = a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))
    got = float(
        bernoulli_kl(
            torch.tensor(math.log(a), dtype=torch.float64), torch.tensor(math.log(b), dtype=torch.float64)
        )
    )
    assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)


@given(st.floats(0.0, 1.0), st.floats(0.001, 0.999))
def test_cross_entropy_matches_definition_for_soft_labels(c, r):
    want = -(c * math.log(r) + (1 - c) * math.log(1 - r))
    got = float(
        bernoulli_cross_entropy(
            torch.tensor(math.log(r), dtype=torch.float64), torch.tensor(c, dtype=torch.float64)
        )
    )
    assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)


@pytest.mark.parametrize("tied", [False, True])
def test_row_max_has_amax_value_and_gradient(tied):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g, dtype=torch.float64)
    if tied:
        x[2, 7] = x[2, 11] = x[2].max() + 1.0  # a tied maximum: amax shares its gradient between the two
    weights = torch.randn(5, generator=g, dtype=torch.float64)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    (parameterizations.row_max(ours) * weights).sum().backward()
    (theirs.amax(dim=-1) * weights).sum().backward()
    assert torch.allclose(parameterizations.row_max(x), x.amax(dim=-1))
    assert torch.allclose(ours.grad, theirs.grad)
