import copy
import math

import pytest
import torch
import torch.nn.functional as F

from dinado.evaluation import base_perplexity, distinct_n, evaluate_texts, markdown_report
from dinado.oracles import KeywordOracle

from .conftest import tiny_gpt2, tiny_marian_with_tokenizer, with_dropout


def test_distinct_n_counts_unique_ngrams():
    assert distinct_n(["a b a b", "a b"], 1) == 2 / 6
    assert distinct_n(["a b a b", "a b"], 2) == 2 / 4
    assert distinct_n([""], 2) == 0.0


def test_base_perplexity_equals_a_hand_computed_value(gpt2_tokenizer):
    model = tiny_gpt2(vocab_size=len(gpt2_tokenizer), layers=1)
    prompt, completion = "The dog", "ran home"
    p = gpt2_tokenizer(prompt)["input_ids"]
    c = gpt2_tokenizer(" " + completion)["input_ids"]
    with torch.no_grad():
        log_p = F.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
    nll = -sum(float(log_p[len(p) - 1 + i, tok]) for i, tok in enumerate(c))
    got = base_perplexity(model, gpt2_tokenizer, [prompt, prompt], [completion, completion])
    assert math.isclose(got, math.exp(nll / len(c)), rel_tol=1e-4)


def test_base_perplexity_scores_each_row_at_its_own_positions(gpt2_tokenizer):
    """Prompts of different lengths in one batch (the LM head runs from the shortest prompt's last position on):
    the same value as each completion scored alone by a full forward pass, by hand."""
    model = tiny_gpt2(vocab_size=len(gpt2_tokenizer), layers=1)
    pairs = [
        ("The dog", "ran home"),
        ("A very long prompt about the old cat", "sat on the mat today"),
        ("Hi", ""),
    ]
    nll, count = 0.0, 0
    for prompt, completion in pairs[:2]:
        p = gpt2_tokenizer(prompt)["input_ids"]
        c = gpt2_tokenizer(" " + completion)["input_ids"]
        with torch.no_grad():
            log_p = F.log_softmax(model(torch.tensor([p + c])).logits[0], -1)
        nll -= sum(float(log_p[len(p) - 1 + i, tok]) for i, tok in enumerate(c))
        count += len(c)
    got = base_perplexity(model, gpt2_tokenizer, [p for p, _ in pairs], [c for _, c in pairs])
    assert math.isclose(got, math.exp(nll / count), rel_tol=1e-4)


def test_evaluate_texts_success_coverage_and_bleu():
    oracle = KeywordOracle(["dog", "run"])
    outputs = ["the two dogs ran home fast", "a cat sat on the mat"]
    m = evaluate_texts(["", ""], outputs, oracle, references=[[o] for o in outputs])
    assert m["success"] == 0.5 and m["coverage"] == 0.5
    assert math.isclose(m["bleu"], 100.0)
    wrong = evaluate_texts(
        ["", ""], outputs, references=[["birds fly south in winter"], ["it is raining again"]]
    )
    assert wrong["bleu"] < 5
    assert m["mean_words"] == 6


def test_markdown_report_shows_systems_and_examples_side_by_side():
    text = markdown_report(
        {"base": {"success": 0.1}, "guide": {"success": 0.9}},
        [{"prompt": "dog =", "base": "a | b", "guide": "dogs"}],
        ["base", "guide"],
    )
    assert "| base | 0.1 |" in text and "| guide | 0.9 |" in text
    assert "| dog = | a \\| b | dogs |" in text


TEXTS = ["the cat sat on the mat", "a dog ran home fast", "birds sing in the tree"]


def _model_in_training_mode(kind):
    """A model with dropout, in training mode (one submodule set to eval), and its tokenizer."""
    from dinado.pretrain import build_tokenizer

    if kind == "seq2seq":
        model, tokenizer = tiny_marian_with_tokenizer(TEXTS * 3)
        inner = model.model.decoder
    else:
        tokenizer = build_tokenizer(TEXTS * 3, vocab_size=300, min_frequency=1)
        model = tiny_gpt2(vocab_size=len(tokenizer))
        inner = model.transformer.h[0]
    with_dropout(model)
    inner.eval()
    return model, tokenizer


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_base_perplexity_is_read_in_eval_mode_and_modes_are_restored(kind):
    model, tokenizer = _model_in_training_mode(kind)
    modes = [m.training for m in model.modules()]
    reference = copy.deepcopy(model).eval()
    prompts, completions = ["the cat", "a dog"], ["sat on the mat", "ran home"]
    torch.manual_seed(0)
    got = base_perplexity(model, tokenizer, prompts, completions)
    expected = base_perplexity(reference, tokenizer, prompts, completions)
    assert math.isclose(got, expected, rel_tol=1e-6)
    assert [m.training for m in model.modules()] == modes and model.training


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_generate_texts_decodes_in_eval_mode_and_modes_are_restored(kind):
    from dinado.text import generate_texts

    model, tokenizer = _model_in_training_mode(kind)
    modes = [m.training for m in model.modules()]
    reference = copy.deepcopy(model).eval()
    prompts = ["the cat", "a dog ran", "birds"]
    kwargs = dict(max_new_tokens=8, do_sample=False, batch_size=2)
    torch.manual_seed(0)
    got, count, _ = generate_texts(model, tokenizer, prompts, **kwargs)
    expected, expected_count, _ = generate_texts(reference, tokenizer, prompts, **kwargs)
    assert (got, count) == (expected, expected_count)
    assert [m.training for m in model.modules()] == modes and model.training


def test_markdown_report_warns_when_the_sample_is_small():
    small = markdown_report(
        {"base": {"success": 0.2, "count": 5}, "guide": {"success": 0.6, "count": 5}}, [], []
    )
    assert "**Small sample:** 5 outputs per system" in small and "±44 points" in small
    large = markdown_report({"base": {"success": 0.2, "count": 500}}, [], [])
    assert "Small sample" not in large
