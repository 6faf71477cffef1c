"""dinado's own calls do not let known third-party FutureWarnings through (without any global filter)."""

import re
import warnings

import pytest
import torch

import dinado
from dinado import Guide, exact
from dinado.baselines import supervised_finetune
from dinado.pretrain import build_tokenizer

from .conftest import randomize_guide, tiny_gpt2

KNOWN = re.compile(r"`is_gradient_checkpointing` is deprecated|`past_key_values` is deprecated")


def _known_future_warnings(record):
    return [
        str(w.message)
        for w in record
        if issubclass(w.category, FutureWarning) and KNOWN.search(str(w.message))
    ]


@pytest.mark.parametrize("variant", ["dinado-merge", "dinado-soft"])
def test_a_guided_run_lets_no_known_future_warning_through(variant):
    base = tiny_gpt2(seed=0)
    samples = dinado.sample(base, [[0, 3]], 4, exact.toy_oracle, 4, seed=0)
    ids = torch.tensor([[0, 3, 5]])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        guide = Guide.create(base, variant)
        randomize_guide(guide)
        dinado.train(guide, samples, max_steps=1, batch_size=4)
        dinado.sample(guide, [[0, 3]], 2, exact.toy_oracle, 4, seed=0)
        dinado.generate(guide, ids, max_new_tokens=4, do_sample=True, top_k=0)
        dinado.generate(guide, ids, max_new_tokens=4, num_beams=3)
        if variant == "dinado-merge":
            guide.merge()
    assert _known_future_warnings(record) == []
    # the filter was local: the same warning raised outside dinado still shows
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        base.is_gradient_checkpointing  # noqa: B018 - reading the deprecated property warns
    assert len(_known_future_warnings(record)) == 1


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_supervised_finetune_lets_no_known_future_warning_through(method):
    pairs = [("cat sun =", "The cat sits in the sun."), ("dog ball =", "A dog chases the ball.")]
    tok = build_tokenizer([f"{p} {t}" for p, t in pairs] * 3, vocab_size=300)
    base = tiny_gpt2(vocab_size=len(tok))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        supervised_finetune(
            base, tok, [p for p, _ in pairs], [t for _, t in pairs], method, max_steps=1, batch_size=2
        )
    assert _known_future_warnings(record) == []
