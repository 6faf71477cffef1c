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


@pytest.mark.parametrize("record", [False, True])
def test_a_shared_prefill_runs_each_distinct_prompt_once_and_changes_no_sample(toy_base, record):
    """With several samples per prompt, the prompt is run once per distinct prompt (its KV cache shared by its
    rows): the same completions, log-probabilities and recorded states as a prefill per row."""
    prompts = [[0, 3, 4], [0, 5], [0, 1, 2, 3]]
    widths = []

    def seen(module, args, kwargs):
        widths.append(tuple((args[0] if args else kwargs["input_ids"]).shape))

    hook = toy_base.register_forward_pre_hook(seen, with_kwargs=True)

    def draw(share):
        widths.clear()
        states = {None: []} if record else None
        samples = dinado.sample(
            toy_base,
            prompts,
            4,
            exact.toy_oracle,
            6,
            batch_size=8,
            seed=5,
            record_states=states,
            share_prefill=share,
        )
        return samples, states, list(widths)

    try:
        shared, shared_states, shared_widths = draw(True)
        plain, plain_states, plain_widths = draw(False)
    finally:
        hook.remove()
    # batches of 8 rows: prompts 0 and 1 (4 rows each), then prompt 2; prompt 2 alone in its batch of 4 repeats
    assert shared_widths[0] == (2, 2) and plain_widths[0] == (8, 3)
    assert (1, 3) in shared_widths and (4, 4) in plain_widths  # the second batch: prompt 2 alone
    assert shared.completions == plain.completions
    for a, b in zip(shared.token_log_p, plain.token_log_p, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    if record:
        for a, b in zip(shared_states[None], plain_states[None], strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_a_cache_that_cannot_gather_rows_falls_back_to_a_prefill_per_row(toy_base, monkeypatch):
    """A base whose KV cache has no ``batch_select_indices`` (not a transformers Cache that can gather rows)
    samples with ``share_prefill=True`` as with a prefill per row, instead of failing."""
    from transformers import DynamicCache

    owner = next(c for c in DynamicCache.__mro__ if "batch_select_indices" in vars(c))
    prompts = [[0, 3, 4], [0, 5]]

    def draw(share):
        return dinado.sample(
            toy_base, prompts, 3, exact.toy_oracle, 5, batch_size=6, seed=2, share_prefill=share
        )

    monkeypatch.delattr(owner, "batch_select_indices")
    assert not hasattr(DynamicCache(), "batch_select_indices")
    shared, plain = draw(True), draw(False)
    assert shared.completions == plain.completions
    for a, b in zip(shared.token_log_p, plain.token_log_p, strict=True):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-6)
