"""dinado.sample keeps only the chosen tokens' log-probabilities: no [steps, N, V] score tensors."""

import copy

import pytest
import torch

import dinado
from dinado import Guide, exact

from .conftest import randomize_guide


class _Spy:
    """Wraps a model's generate() and records the keyword arguments of every call."""

    def __init__(self, model):
        self.calls = []
        inner = model.generate

        def generate(*args, **kwargs):
            self.calls.append(dict(kwargs))
            return inner(*args, **kwargs)

        model.generate = generate


@pytest.mark.parametrize("source", ["base", "guide", "proposal"])
def test_sample_never_asks_generate_for_scores_or_logits(toy_base, source):
    kwargs = {}
    if source == "guide":
        src = Guide.create(toy_base, "dinado-soft")
        randomize_guide(src)
        spy = _Spy(src.base)
    elif source == "proposal":
        src, kwargs["proposal"] = toy_base, exact.toy_base(11, init_scale=0.3)
        spy = _Spy(kwargs["proposal"])
    else:
        src, spy = toy_base, _Spy(toy_base)
    samples = dinado.sample(src, [[0], [0, 3]], 8, exact.toy_oracle, 6, temperature=1.5, top_p=0.9, **kwargs)
    assert len(spy.calls) == 1
    call = spy.calls[0]
    assert not call.get("output_scores") and not call.get("output_logits")
    assert not call.get("return_dict_in_generate")
    assert len(samples.token_log_p[0]) == len(samples.completions[0])


def test_other_warpers_of_the_generation_config_are_switched_off_and_the_records_stay_exact(toy_base):
    # a min-p warper would run after the recorder: dinado.sample switches it off, so these are samples from p
    toy_base.generation_config.min_p = 0.5
    samples = dinado.sample(toy_base, [exact.TOY_PROMPT], 200, exact.toy_oracle, 6, seed=3)
    assert samples.log_weights is None
    model = copy.deepcopy(toy_base).eval()
    errors = []
    for prompt, comp, lp, lpi in zip(
        samples.prompts, samples.completions, samples.token_log_p, samples.token_log_proposal, strict=True
    ):
        with torch.no_grad():
            ids = torch.tensor([prompt + comp])
            ref = torch.log_softmax(model(ids).logits.float(), -1)[0]
        expected = [float(ref[len(prompt) - 1 + i, t]) for i, t in enumerate(comp)]
        errors += [abs(a - b) for a, b in zip(lp + lpi, expected + expected, strict=True)]
    assert len(errors) > 400 and max(errors) < 1e-5
