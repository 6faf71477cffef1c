import pytest
import torch
import torch.nn.functional as F

from dinado import VARIANTS, Guide
from dinado.objectives import prefix_log_values

from .conftest import randomize_guide, tiny_gpt2


def _batch():
    ids = torch.tensor([[0, 5, 9, 0, 3, 7, 1, 0], [0, 0, 2, 8, 4, 6, 0, 0]])  # EOS (0) inside, and as pad
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_q_equals_p_at_initialisation(variant):
    base = tiny_gpt2()
    ids, mask = _batch()
    with torch.no_grad():
        log_p = F.log_softmax(
            base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits,
            -1,
        )
        guide = Guide.create(base, variant)
        log_q = guide.next_token_logprobs(ids, mask)
    real = mask.bool()
    assert (log_q - log_p)[real].abs().max() < 1e-5


@pytest.mark.parametrize("variant", ["dinado-hard", "dinado-merge"])
def test_hard_consistency_satisfies_bellman_identically_at_random_parameters(variant):
    options = {"consistency": "hard"} if variant == "dinado-merge" else {}
    guide = Guide.create(tiny_gpt2(), variant, **options)
    randomize_guide(guide)
    ids = torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    completion = torch.zeros_like(ids)
    completion[:, 3:] = 1
    with torch.no_grad():
        out = guide(ids)
        log_values, log_root = guide.parameterization.log_values(
            out.log_p, out.direction, out.norm, ids, completion
        )
        log_r = prefix_log_values(log_values, ids)  # R(x_<=t) at index t-1
        log_s = torch.logsumexp(out.log_p + log_values, dim=-1)  # sum_v p(v|x_<=t) R(x_<=t + v)
    # the values must actually vary, or the identity below would hold trivially
    assert log_r[:, 2:].std() > 0.05
    residual = (log_s[:, 3:-1] - log_r[:, 2:-1]).exp() - 1.0  # completion prefixes x_<=t, t = 3..L-2
    assert residual.abs().max() < 1e-4
    root_residual = (log_s[:, 2] - log_root).exp() - 1.0  # R(c) = sum_v p(v|c) R(c + v)
    assert root_residual.abs().max() < 1e-4


def test_soft_variants_are_not_consistent_by_construction():
    """The same residual for DiNADO-Soft at random parameters is large: the Hard test above can fail."""
    guide = Guide.create(tiny_gpt2(), "dinado-soft")
    randomize_guide(guide)
    ids = torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros_like(ids)
    completion[:, 3:] = 1
    with torch.no_grad():
        out = guide(ids)
        log_values, _ = guide.parameterization.log_values(out.log_p, out.direction, out.norm, ids, completion)
        residual = (
            torch.logsumexp(out.log_p + log_values, -1)[:, 3:-1] - prefix_log_values(log_values, ids)[:, 2:-1]
        )
    assert residual.abs().max() > 1e-2


def test_base_stays_frozen_and_in_eval_mode():
    base = tiny_gpt2()
    guide = Guide.create(base, "dinado-soft")
    guide.train()
    assert not base.training
    assert not any(p.requires_grad for p in base.parameters())
    assert all(p.requires_grad for p in guide.module.parameters())


def test_unknown_variant_and_option_are_refused():
    with pytest.raises(ValueError, match="unknown variant 'dinado'.*nado, dinado-hard"):
        Guide.create(tiny_gpt2(), "dinado")
    with pytest.raises(TypeError, match="unknown Guide option.*num_layer\\b"):
        Guide.create(tiny_gpt2(), "nado", num_layer=3)
    with pytest.raises(ValueError, match="fixes consistency"):
        Guide.create(tiny_gpt2(), "dinado-soft", consistency="hard")
