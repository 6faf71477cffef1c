"""Candidate-restricted guidance (``candidates=k``): the guide's direction on p's top-k tokens and the tokens
already in the sequence only (dinado.parameterizations.candidate_set).

It decodes q_K (Parameterization.candidate_log_q), not q_theta: the candidates keep their guided values, the
other tokens a zero direction. The fast path in the processor computes the head at
k tokens; guide.next_token_logprobs(..., candidates=k) computes q_k from the full direction, as a reference.
That the processor decodes q_k at every step, for every head, is checked in tests/test_heads.py.
"""

import pytest
import torch

import dinado
from dinado import Guide, exact
from dinado.parameterizations import candidate_set, parameterization_for

from .conftest import randomize_guide, tiny_causal
from .test_decoding import MASK, PROMPTS, _check_steps, decoded_steps

HEADS = {"full": {}, "tied-rank3": {"head": "tied", "head_rank": 3}, "no-pointer": {"pointer": False}}


@pytest.mark.parametrize("consistency", ["soft", "hard"])
def test_dinado_q_k_is_q_theta_with_a_zero_direction_off_the_candidates(consistency):
    variant = "dinado-soft" if consistency == "soft" else "dinado-hard"
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
    rest = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, top, False)
    zero_off_k = direction.masked_fill(rest, 0.0)
    assert (q_k - param.log_q(log_p, zero_off_k, 1.5)).abs().max() < 1e-5
    repeated = torch.cat([top, top[:, :1]], -1)  # a token listed twice counts once
    again = param.candidate_log_q(log_p, repeated, direction.gather(-1, repeated), 1.5)
    assert (again - q_k).abs().max() < 1e-6


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_candidates_are_refused(bad):
    guide = Guide.create(tiny_causal("gpt2"), "dinado-soft")
    with pytest.raises(ValueError, match="candidates must be a positive integer"):
        dinado.generate(guide, PROMPTS, MASK, max_new_tokens=2, candidates=bad)


def test_candidates_on_merge_are_refused_with_the_reason():
    guide = Guide.create(tiny_causal("gpt2"), "dinado-merge", lora_r=2)
    with pytest.raises(ValueError, match="option of the module variants"):
        dinado.generate(guide, PROMPTS, MASK, max_new_tokens=2, candidates=3)


@pytest.mark.parametrize("alpha", [1.0, 2.5])
def test_nado_q_k_keeps_the_tail_at_p_and_tilts_the_candidates_by_r_to_the_alpha(alpha):
    # NADO has no neutral direction (a zero logit is R = 1/2): off the candidates q_K = p, and the candidates
    # share p's mass on K in proportion to p * R^alpha
    param = parameterization_for("nado", "soft")
    gen = torch.Generator().manual_seed(1)
    log_p = torch.log_softmax(torch.randn(4, 9, generator=gen), -1)
    direction = 2 * torch.randn(4, 9, generator=gen)
    everything = torch.arange(9).expand(4, 9)
    full = param.log_q(log_p, direction, alpha)
    assert (param.candidate_log_q(log_p, everything, direction, alpha) - full).abs().max() < 1e-5
    top = log_p.topk(3).indices
    q_k = param.candidate_log_q(log_p, top, direction.gather(-1, top), alpha)
    assert q_k.logsumexp(-1).abs().max() < 1e-5
    rest = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, top, False)
    assert (q_k - log_p)[rest].abs().max() < 1e-5  # the tail keeps p
    on_k = log_p.gather(-1, top) + alpha * torch.nn.functional.logsigmoid(direction.gather(-1, top))
    expected = on_k - on_k.logsumexp(-1, keepdim=True) + log_p.gather(-1, top).logsumexp(-1, keepdim=True)
    assert (q_k.gather(-1, top) - expected).abs().max() < 1e-5
    shifted = param.candidate_log_q(log_p + 3.0, top, direction.gather(-1, top), alpha)  # logits work too
    assert (shifted - q_k).abs().max() < 1e-5
    repeated = torch.cat([top, top[:, :1]], -1)  # a token listed twice counts once
    again = param.candidate_log_q(log_p, repeated, direction.gather(-1, repeated), alpha)
    assert (again - q_k).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["sampling", "beam3"])
def test_nado_decodes_q_k_at_every_step(mode):
    guide = Guide.create(tiny_causal("gpt2", vocab_size=12), "nado")
    randomize_guide(guide)
    guide.eval()
    steps = decoded_steps(guide, mode, candidates=4)
    assert _check_steps(guide, steps, PROMPTS.shape[1], candidates=4) < 1e-4
    assert _check_steps(guide, steps, PROMPTS.shape[1]) > 1e-3  # q_K, not q_theta


def test_on_the_exact_testbed_more_candidates_cost_less_kl(toy_base):
    torch.manual_seed(0)
    guide = Guide.create(toy_base, "dinado-soft")
    args = (exact.TOY_PROMPT, exact.toy_oracle, 4, exact.TOY_EOS)
    samples = exact.evaluate(guide, *args).draw(4000, exact.TOY_PROMPT, seed=0)
    dinado.train(guide, samples, max_steps=300, batch_size=256, seed=0)
    kl = {k: exact.evaluate(guide, *args, candidates=k).kl_q_star_q for k in (1, 3, exact.TOY_VOCAB)}
    assert abs(kl[exact.TOY_VOCAB] - exact.evaluate(guide, *args).kl_q_star_q) < 1e-6
    assert kl[1] > kl[3] > kl[exact.TOY_VOCAB]


def test_the_candidates_are_the_top_k_and_the_tokens_so_far():
    log_p = torch.log_softmax(torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0, -2.0]]), -1)
    tokens = torch.tensor([[4, 0, 4, 5]])
    present = torch.tensor([[True, True, True, False]])  # token 5 is not there yet (or is padding)
    ids = candidate_set(log_p, 2, tokens, present)
    assert ids.tolist() == [[0, 1, 4, 0, 4, 0]]  # absent positions stand as p's top token
