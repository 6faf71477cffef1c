"""dinado.exact: the exhaustive evaluation runs in eval mode; ExactResult's short repr."""

import copy
import re

import torch

from dinado import Guide, exact

from .conftest import randomize_guide, with_dropout


def test_exact_evaluation_runs_the_guide_in_eval_mode_and_restores_its_modes(toy_base):
    guide = Guide.create(toy_base, "dinado-soft")
    randomize_guide(guide, scale=0.5)
    with_dropout(guide)  # training mode with dropout in the guide's module, as between training steps
    guide.module.body.h[0].eval()
    modes = [m.training for m in guide.modules()]
    args = (exact.TOY_PROMPT, exact.toy_oracle, 4, exact.TOY_EOS)
    torch.manual_seed(0)
    got = exact.evaluate(guide, *args)
    expected = exact.evaluate(copy.deepcopy(guide).eval(), *args)
    assert (got.log_q - expected.log_q).abs().max() < 1e-6
    assert (got.log_p - expected.log_p).abs().max() < 1e-6
    assert [m.training for m in guide.modules()] == modes and guide.training


def test_exact_result_repr_is_short_and_shows_the_scalars(toy_base):
    result = exact.evaluate(
        Guide.create(toy_base, "nado"),
        exact.TOY_PROMPT,
        exact.toy_oracle,
        exact.TOY_MAX_NEW_TOKENS,
        exact.TOY_EOS,
    )
    text = repr(result)
    assert len(result.completions) > 3000 and len(text) < 300
    assert text.startswith("ExactResult(") and f"completions={len(result.completions)}" in text
    for name in ("kl_q_star_q", "kl_q_star_p", "success_q", "success_p"):
        value = float(re.search(rf"{name}=([-+0-9.e]+)", text).group(1))
        assert abs(value - getattr(result, name)) < 1e-3 * max(1.0, abs(getattr(result, name)))
