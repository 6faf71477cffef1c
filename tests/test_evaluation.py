import math

import torch
import torch.nn.functional as F

from dinado.evaluation import base_perplexity, distinct_n, evaluate_texts, markdown_report
from dinado.oracles import KeywordOracle

from .conftest import tiny_gpt2


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
