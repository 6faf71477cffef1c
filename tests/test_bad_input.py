import math

import pytest

import dinado
from dinado import Guide, SampleSet, exact

from .conftest import tiny_gpt2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=[1.0, 1.5]), r"labels\[1\] = 1.5: labels must be finite numbers in \[0, 1\]"),
        (dict(labels=[-0.1, 1.0]), r"labels\[0\] = -0.1"),
        (dict(labels=[1.0, math.nan]), r"labels\[1\] = nan"),
        (dict(completions=[[3], []]), r"completions\[1\] is empty"),
        (dict(prompts=[[]] * 2), r"prompts\[0\] is empty"),
        (dict(labels=[1.0]), r"same length; got prompts=2, completions=2, labels=1"),
        (dict(completions=[[3]]), r"same length; got prompts=2, completions=1, labels=2"),
        (dict(log_weights=[0.0]), r"log_weights=1"),
        (dict(log_weights=[0.0, math.inf]), r"log_weights\[1\] = inf"),
        (dict(completions=[[3], [-4]]), r"completions\[1\] holds -4"),
        (dict(completions=[[3], [2.5]]), r"completions\[1\] holds 2.5"),
    ],
)
def test_sampleset_rejects_bad_input_with_a_specific_message(kwargs, message):
    args = dict(prompts=[[0], [0]], completions=[[3], [4, 0]], labels=[1.0, 0.0])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        SampleSet.from_token_ids(**args)


def test_training_refuses_token_ids_outside_the_base_vocabulary():
    guide = Guide.create(tiny_gpt2(vocab_size=40), "nado")
    samples = SampleSet.from_token_ids([[0]], [[45, 0]], [1.0])
    with pytest.raises(ValueError, match="token id >= the base vocabulary size 40"):
        dinado.train(guide, samples, max_steps=1)


def test_training_needs_a_length():
    guide = Guide.create(tiny_gpt2(), "nado")
    with pytest.raises(ValueError, match="give max_steps or epochs"):
        dinado.train(guide, SampleSet.from_token_ids([[0]], [[3]], [1.0]))


@pytest.mark.parametrize(
    "oracle, message",
    [
        (lambda p, c: [2.0] * len(c), r"returned 2.0 for sample 0: values must be finite and in \[0, 1\]"),
        (lambda p, c: [math.nan] * len(c), r"returned nan for sample 0"),
        (lambda p, c: [1.0], r"returned 1 values for 4 samples"),
        (
            lambda p, c: 1 / 0,
            r"raised on a batch of 4 samples \(first failing: sample 0, completion .*\): division by zero",
        ),
    ],
)
def test_sampling_checks_what_the_oracle_returns(oracle, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        dinado.sample(exact.toy_base(3, init_scale=0.3), [[0]], 4, oracle, max_new_tokens=3)
