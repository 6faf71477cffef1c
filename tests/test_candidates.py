"""Candidate-restricted guidance (``candidates=k``): the guide's direction on p's top-k tokens and the tokens
already in the sequence only (dinado.parameterizations.candidate_set).

It decodes q_k (Parameterization.candidate_log_q), not q_theta: the candidates keep their guided ratios, the
other tokens share the candidates' p-weighted mean boost. The fast path in the processor computes the head at
k tokens; guide.next_token_logprobs(..., candidates=k) computes q_k from the full direction, as a reference.
That the processor decodes q_k at every step, for every head, is checked in tests/test_heads.py.
"""

import pytest
import torch

import dinado
from dinado import Guide, exact
from dinado.parameterizations import candidate_set, parameterization_for

from .conftest import tiny_causal
from .test_decoding import MASK, PROMPTS

HEADS = {"full": {}, "tied-rank3": {"head": "tied", "head_rank": 3}, "no-pointer": {"pointer": False}}


@pytest.mark.parametrize(("variant", "consistency"), [("nado", "soft"), ("dinado-soft", "soft")])
def test_q_k_keeps_guided_ratios_on_the_candidates_and_p_ratios_elsewhere(variant, consistency):
    param = parameterization_for(variant, consistency)
    gen = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(4, 9, generator=gen), -1)
    direction = torch.randn(4, 9, generator=gen)
    full = param.log_q(log_p, direction, alpha=1.5)
    everything = torch.arange(9).expand(4, 9)
    assert (param.candidate_log_q(log_p, everything, direction, 1.5) - full).abs().max() < 1e-5
    top = log_p.topk(3).indices
    q_k = param.candidate_log_q(log_p, top, direction.gather(-1, top), 1.5)
    assert q_k.logsumexp(-1).abs().max() < 1e-5
    assert (q_k - full).abs().max() > 1e-2  # an approximation, not q_theta
    ratio = (q_k - full).gather(-1, top)  # the candidates: q_theta's ratios
    assert (ratio - ratio[:, :1]).abs().max() < 1e-5
    rest = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, top, False)
    gap = (q_k - log_p)[rest].view(4, -1)  # the others: p's ratios
    assert (gap - gap[:, :1]).abs().max() < 1e-5
    # the others' share: as if each were a candidate with the candidates' p-weighted mean boost
    boost = 1.5 * param.guidance(direction.gather(-1, top))
    log_p_top = log_p.gather(-1, top)
    mean = torch.logsumexp(log_p_top + boost, -1) - log_p_top.logsumexp(-1)
    expected_gap = mean - torch.logsumexp(
        torch.cat([log_p_top + boost, log_p[rest].view(4, -1) + mean[:, None]], -1), -1
    )
    assert (gap[:, 0] - expected_gap).abs().max() < 1e-5


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_candidates_are_refused(bad):
    guide = Guide.create(tiny_causal("gpt2"), "nado")
    with pytest.raises(ValueError, match="candidates must be a positive integer"):
        dinado.generate(guide, PROMPTS, MASK, max_new_tokens=2, candidates=bad)


def test_candidates_on_merge_are_refused_with_the_reason():
    guide = Guide.create(tiny_causal("gpt2"), "dinado-merge", lora_r=2)
    with pytest.raises(ValueError, match="option of the module variants"):
        dinado.generate(guide, PROMPTS, MASK, max_new_tokens=2, candidates=3)


def test_on_the_exact_testbed_more_candidates_cost_less_kl(toy_base):
    torch.manual_seed(0)
    guide = Guide.create(toy_base, "dinado-soft")
    args = (exact.TOY_PROMPT, exact.toy_oracle, 4, exact.TOY_EOS)
    samples = exact.evaluate(guide, *args).draw(4000, exact.TOY_PROMPT, seed=0)
    dinado.train(guide, samples, max_steps=300, batch_size=256, seed=0)
    kl = {k: exact.evaluate(guide, *args, candidates=k).kl_q_star_q for k in (1, 3, exact.TOY_VOCAB)}
    assert abs(kl[exact.TOY_VOCAB] - exact.evaluate(guide, *args).kl_q_star_q) < 1e-6
    assert kl[1] > kl[3] > kl[exact.TOY_VOCAB]


def test_the_candidates_are_the_top_k_and_the_tokens_so_far_each_counted_once():
    log_p = torch.log_softmax(torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0, -2.0]]), -1)
    tokens = torch.tensor([[4, 0, 4, 5]])
    present = torch.tensor([[True, True, True, False]])  # token 5 is not there yet (or is padding)
    ids, valid = candidate_set(log_p, 2, tokens, present)
    assert sorted(ids[valid].tolist()) == [0, 1, 4]
    assert set(ids[~valid].tolist()) == {0}  # repeats and absent positions stand as p's top token
    # so a token the prompt names is guided though p ranks it low, and the repeats do not count twice
    param = parameterization_for("dinado-soft", "soft")
    direction = torch.tensor([[0.0, 1.0, 3.0, 0.0, 3.0, 0.0]]).gather(-1, ids)
    q = param.candidate_log_q(log_p, ids, direction, 1.0, valid)
    kept = torch.tensor([0, 1, 4])
    full = param.log_q(log_p, torch.tensor([[0.0, 1.0, 3.0, 0.0, 3.0, 0.0]]))
    ratio = (q - full)[0, kept]
    assert (ratio - ratio[0]).abs().max() < 1e-5
    mean = torch.logsumexp(log_p[0, kept] + torch.tensor([0.0, 1.0, 3.0]), 0) - log_p[0, kept].logsumexp(0)
    gap = (q - log_p)[0]
    assert (
        abs((gap[2] - gap[0]) - mean.item()) < 1e-5
    )  # a tail token: the candidates' mean boost, counted once
