"""Training on the exact testbed (method.md §6): the sharpest check that masks, signs and offsets are right.

Testbed: a random 2-layer GPT-2 over 6 tokens, completions of up to 6 tokens (19,531 of them), oracle "tokens 1
and 2 both appear": success under p is 2.2% and KL(q* || p) = 3.81 nats. Samples are exact draws from p.
"""

import pytest

import dinado
from dinado import VARIANTS, Guide, exact

STEPS = 1500
BATCH = 256
NUM_SAMPLES = 20_000
# Importance sampling must reach the KL of samples from p within this many nats:
IS_TOLERANCE = 0.15
# ... and the same samples without their weights must end at least this much worse:
UNWEIGHTED_GAP = 0.2


def _evaluate(guide):
    return exact.evaluate(guide, exact.TOY_PROMPT, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, exact.TOY_EOS)


def _fresh(variant):
    return Guide.create(exact.toy_base(3, init_scale=0.3), variant)


@pytest.fixture(scope="module")
def testbed():
    start = _evaluate(_fresh("nado"))  # q_theta = p at initialisation
    samples = start.draw(NUM_SAMPLES, exact.TOY_PROMPT, seed=0)
    return {"start": start, "samples": samples, "trained": {}}


def _train_on_p(testbed, variant):
    if variant not in testbed["trained"]:
        guide = _fresh(variant)
        dinado.train(guide, testbed["samples"], max_steps=STEPS, batch_size=BATCH, seed=0)
        testbed["trained"][variant] = _evaluate(guide)
    return testbed["trained"][variant]


def test_testbed_is_the_documented_one(testbed):
    start = testbed["start"]
    assert abs(start.mass_p - 1.0) < 1e-6
    assert 0.01 < start.success_p < 0.05
    assert abs(start.kl_q_star_p - 3.81) < 0.01
    assert abs(start.kl_q_star_q - start.kl_q_star_p) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_on_samples_from_p_recovers_q_star(testbed, variant):
    start = testbed["start"]
    result = _train_on_p(testbed, variant)
    assert result.kl_q_star_q <= 0.2 * start.kl_q_star_p, (
        f"KL {result.kl_q_star_q:.3f} from {start.kl_q_star_p:.3f}"
    )
    assert result.success_q > 0.8


def test_importance_weighted_proposal_samples_match_samples_from_p(testbed):
    # proposal: a guide trained briefly on a small budget, sampled exactly, weights log p - log q_theta
    proposal = _fresh("nado")
    dinado.train(
        proposal, testbed["start"].draw(2000, exact.TOY_PROMPT, seed=1), max_steps=200, batch_size=BATCH
    )
    proposal_result = _evaluate(proposal)
    assert proposal_result.success_q > 3 * testbed["start"].success_p  # a proposal worth using
    samples = proposal_result.draw(NUM_SAMPLES, exact.TOY_PROMPT, seed=2, from_q=True)
    reference = _train_on_p(testbed, "dinado-soft").kl_q_star_q
    kls = {}
    for use_weights in (True, False):
        guide = _fresh("dinado-soft")
        dinado.train(guide, samples, max_steps=STEPS, batch_size=BATCH, seed=0, use_weights=use_weights)
        kls[use_weights] = _evaluate(guide).kl_q_star_q
    assert kls[True] <= reference + IS_TOLERANCE, kls
    assert kls[False] >= kls[True] + UNWEIGHTED_GAP, kls
