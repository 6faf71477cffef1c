"""The exact conditional testbed (dinado.exact): do the guides learn the rule "use the token the prompt names"?

Prompts [BOS, k] name a keyword, the oracle asks for k in the completion, the base was taught to copy now and
then (exact.copy_base). Guides train on exact samples for 20 keywords and are scored exactly on 3 they never saw.
Measured (docs/results/commongen.md): without the pointer the module variants stay at the base on held-out
keywords (DiNADO-Soft's KL even ends above it); with it (the default) DiNADO-Soft and -Hard cut the held-out
KL(q*‖p) by about 99% and NADO by about 69%.
"""

import pytest
import torch

import dinado
from dinado import Guide, exact

VOCAB, NEW, HELD_OUT = 24, 2, 3


@pytest.fixture(scope="module")
def world():
    base = exact.copy_base(0, vocab_size=VOCAB, max_new_tokens=NEW, copy_rate=0.1)
    seen, held_out = exact.conditional_split(VOCAB, HELD_OUT, 0)
    start = exact.evaluate_conditional(Guide.create(base, "nado"), seen, held_out, NEW)
    samples = exact.draw_conditional(start.seen, 300, seed=0)
    return base, seen, held_out, start.summary(), samples


def _trained(world, variant, **options):
    base, seen, held_out, _, samples = world
    torch.manual_seed(0)
    guide = Guide.create(base, variant, **options)
    dinado.train(guide, samples, max_steps=300, batch_size=256, seed=0)
    return exact.evaluate_conditional(guide, seen, held_out, NEW).summary()


def test_the_world_is_the_documented_one(world):
    _, seen, held_out, start, samples = world
    assert len(seen) >= 20 and len(held_out) == HELD_OUT and not set(seen) & set(held_out)
    assert 0.03 < start["held_out_success_p"] < 0.1 and 0.03 < samples.positive_rate < 0.1
    assert abs(start["held_out_kl_q_star_q"] - start["held_out_kl_q_star_p"]) < 1e-6


@pytest.mark.parametrize("variant", dinado.VARIANTS)
def test_no_default_guide_ends_above_the_base_on_held_out_prompts(world, variant):
    start = world[3]
    result = _trained(world, variant)
    assert result["held_out_kl_q_star_q"] < start["held_out_kl_q_star_p"]
    assert result["seen_kl_q_star_q"] < start["seen_kl_q_star_p"]
    if variant in (
        "dinado-soft",
        "dinado-hard",
    ):  # the rule is learned: held-out prompts gain as seen ones do
        assert result["held_out_kl_q_star_q"] < 0.5 * start["held_out_kl_q_star_p"]
        assert result["held_out_success_q"] > 0.5


def test_without_the_pointer_the_module_does_not_generalise(world):
    # the instrument's point: the same guide without its copy mechanism learns word by word
    start = world[3]
    result = _trained(world, "dinado-soft", pointer=False)
    assert result["held_out_kl_q_star_q"] > 0.8 * start["held_out_kl_q_star_p"]
