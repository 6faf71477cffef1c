import math
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, GPT2Config

import dinado
from dinado.oracles import (
    AllOf,
    AnyOf,
    CallableOracle,
    ClassifierOracle,
    Floor,
    KeywordOracle,
    Not,
    OracleBase,
    RegexOracle,
    TextOracle,
    WeightedProduct,
    as_token_oracle,
    call_oracle,
    load_callable,
    oracle_from_config,
    register_oracle,
    registry,
)
from dinado.oracles import base as oracle_base
from dinado.tasks.commongen import coverage_oracle

from .conftest import tiny_gpt2, with_dropout

# module-level helpers, importable as "tests.test_oracles:..." -------------------------------------------


def ends_with_question(prompts, completions):
    return [float(c.rstrip().endswith("?")) for c in completions]


def completion_length_is_even(prompts, completions):
    return [float(len(c) % 2 == 0) for c in completions]


def first_word_of_prompt(prompt):
    return prompt.split()[:1]


NOT_CALLABLE = 3


def const(*values):
    """A text-agnostic oracle returning ``values`` for the samples it is given (by position in the batch)."""
    calls = []

    def oracle(prompts, completions):
        calls.append(list(completions))
        return [values[int(c)] for c in completions]

    oracle.calls = calls
    return oracle


def blank(n):
    return [""] * n


# keywords ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keyword, text",
    [
        ("dog", "Two dogs played."),
        ("run", "She ran home."),
        ("ski", "We went skiing."),
        ("child", "The children laughed."),
        ("person", "Three people waited."),
        ("go", "He went away."),
        ("catch", "The dog caught it."),
        ("mouse", "Three mice."),
        ("dogs", "a dog"),  # inflected keyword, base form in the text
        ("ice cream", "They ate ice creams."),
        ("ice cream", "They ate ice-cream!"),
        ("take off", "The plane took off."),
        ("take off", "It is taking off"),
        ("frisbee", "Frisbees flew."),  # not in the dictionary: the rules handle it
        (
            "selfie",
            "Too many selfies.",
        ),  # lemminflect's own OOV guess is "selfy"; the suffix rules add "selfie"
        ("dog", "the DOG's bowl"),
        ("dog", "(dog)"),
    ],
)
def test_keyword_matches_inflections_case_and_punctuation(keyword, text):
    assert KeywordOracle([keyword])(blank(1), [text]) == [1.0]


@pytest.mark.parametrize(
    "keyword, text",
    [
        ("dog", "That is dogma."),
        ("dog", "a hotdog stand"),
        ("ski", "a skill to learn"),
        ("ski", "the skier"),
        ("child", "childhood memories"),
        ("ice cream", "cream ice"),
        ("ice cream", "ice and cream"),
        ("take off", "took it off"),
        ("run", "a brunette"),
        ("go", "long ago"),
    ],
)
def test_keyword_does_not_match_other_words(keyword, text):
    assert KeywordOracle([keyword])(blank(1), [text]) == [0.0]


def test_keywords_all_or_nothing_soft_fraction_and_coverage():
    keywords = ["dog", "frisbee", "catch", "park"]
    texts = ["The dog caught the frisbee in the park.", "A dog catches.", "Nothing here."]
    assert KeywordOracle(keywords)(blank(3), texts) == [1.0, 0.0, 0.0]
    assert KeywordOracle(keywords, soft=True)(blank(3), texts) == [1.0, 0.5, 0.0]
    assert KeywordOracle(keywords).coverage(blank(3), texts) == [
        [True, True, True, True],
        [True, False, True, False],
        [False, False, False, False],
    ]


def test_keywords_judge_the_completion_not_the_prompt():
    assert KeywordOracle(["dog"])(["a dog"], ["a cat"]) == [0.0]


def test_keywords_from_any_callable():
    oracle = KeywordOracle(first_word_of_prompt)
    assert oracle(["dog cat", "cat dog"], ["dogs", "dogs"]) == [1.0, 0.0]
    assert repr(oracle) == "KeywordOracle('tests.test_oracles:first_word_of_prompt', soft=False)"
    assert repr(KeywordOracle(lambda p: ["x"])).startswith(
        "KeywordOracle(test_keywords_from_any_callable.<locals>.<lambda>"
    )


def test_empty_keyword_sets_raise():
    with pytest.raises(ValueError, match="empty keyword set"):
        KeywordOracle([])
    with pytest.raises(ValueError, match="empty keyword set for sample 1"):
        coverage_oracle()(["dog =", " ="], ["dog", "dog"])
    with pytest.raises(
        RuntimeError,
        match=r"raised on a batch of 1 samples \(first failing: sample 0, .*\): empty keyword set",
    ):
        call_oracle(coverage_oracle(), [" ="], ["dog"])
    with pytest.raises(ValueError, match="keyword '!!' contains no words"):
        KeywordOracle(["dog", "!!"])
    with pytest.raises(TypeError, match="list of strings"):
        KeywordOracle("dog")


def test_keywords_say_which_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lemminflect", None)
    with pytest.raises(ImportError, match=r"pip install 'lemminflect"):
        KeywordOracle(["dog"])


def test_keywords_refuse_token_ids():
    with pytest.raises(TypeError, match="wrap it in TextOracle"):
        KeywordOracle(["dog"])([[1]], [[2, 3]])


# regex ---------------------------------------------------------------------------------------------------


def test_regex_search_and_fullmatch():
    texts = ["Yes.", " yes", "I say yes!", "no"]
    assert RegexOracle(r"yes")(blank(4), texts) == [0.0, 1.0, 1.0, 0.0]
    assert RegexOracle(r"yes", flags="IGNORECASE")(blank(4), texts) == [1.0, 1.0, 1.0, 0.0]
    assert RegexOracle(r"yes\.?", flags=["i"], mode="fullmatch")(blank(4), texts) == [1.0, 0.0, 0.0, 0.0]
    assert RegexOracle(r"yes\.?", flags="I", mode="fullmatch", strip=True)(blank(4), texts) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    import re

    assert RegexOracle(r"a.b", flags=re.DOTALL)(blank(2), ["a\nb", "ab"]) == [1.0, 0.0]
    assert RegexOracle(r"a.b")(blank(1), ["a\nb"]) == [0.0]


def test_regex_errors_and_repr():
    with pytest.raises(ValueError, match="invalid regular expression '\\(': "):
        RegexOracle("(")
    with pytest.raises(ValueError, match="mode must be one of search, fullmatch, got 'match'"):
        RegexOracle("a", mode="match")
    with pytest.raises(ValueError, match="unknown regex flag 'CASELESS'"):
        RegexOracle("a", flags="CASELESS")
    assert repr(RegexOracle("a+", flags="i|s")) == "RegexOracle('a+', flags=IGNORECASE|DOTALL, mode='search')"


# callables -----------------------------------------------------------------------------------------------


def test_load_callable_and_its_errors():
    assert load_callable("tests.test_oracles:ends_with_question") is ends_with_question
    assert (
        load_callable("dinado.oracles:ClassifierOracle.from_pretrained") == ClassifierOracle.from_pretrained
    )
    with pytest.raises(ValueError, match="of the form 'package.module:function', got 'tests.test_oracles'"):
        load_callable("tests.test_oracles")
    with pytest.raises(ValueError, match="of the form"):
        load_callable(":f")
    with pytest.raises(ImportError, match="no module named 'no_such_module_xyz'"):
        load_callable("no_such_module_xyz.sub:f")
    with pytest.raises(AttributeError, match="'tests.test_oracles' has no attribute 'missing'"):
        load_callable("tests.test_oracles:missing")
    with pytest.raises(TypeError, match="it is a int, not a callable"):
        load_callable("tests.test_oracles:NOT_CALLABLE")


def test_callable_oracle_on_text_and_tokens():
    oracle = CallableOracle("tests.test_oracles:ends_with_question")
    assert oracle(blank(2), ["Why?", "Because."]) == [1.0, 0.0]
    assert repr(oracle) == "CallableOracle('tests.test_oracles:ends_with_question', on='text')"
    assert oracle.level == "text"
    on_tokens = CallableOracle(lambda p, c: [float(7 in x) for x in c], on="tokens")
    assert on_tokens([[0], [0]], [[7, 1], [1]]) == [1.0, 0.0]
    assert as_token_oracle(on_tokens, tokenizer=None) is on_tokens
    with pytest.raises(ValueError, match="on must be 'text' or 'tokens'"):
        CallableOracle(ends_with_question, on="ids")
    with pytest.raises(ValueError, match="not importable by name"):
        on_tokens.to_config()


def test_call_oracle_catches_bad_values_from_every_kind_of_oracle():
    with pytest.raises(ValueError, match=r"returned 1.5 for sample 0: values must be finite and in \[0, 1\]"):
        call_oracle(CallableOracle(lambda p, c: [1.5] * len(c)), blank(2), blank(2))
    with pytest.raises(ValueError, match="returned 'yes' for sample 1"):
        call_oracle(CallableOracle(lambda p, c: [1.0, "yes"]), blank(2), blank(2))
    with pytest.raises(ValueError, match="returned 1 values for 2 samples"):
        call_oracle(CallableOracle(lambda p, c: [1.0]), blank(2), blank(2))
    with pytest.raises(
        RuntimeError,
        match=r"raised on a batch of 2 samples \(first failing: sample 0, .*\): division by zero",
    ):
        call_oracle(CallableOracle(lambda p, c: 1 / 0), blank(2), blank(2))
    # a bad child inside a composition is caught too, and named
    with pytest.raises(RuntimeError, match=r"raised on a batch of 2 samples .*returned -0.5 for sample 0"):
        call_oracle(AllOf(RegexOracle(""), lambda p, c: [-0.5] * len(c)), blank(2), blank(2))
    assert call_oracle(KeywordOracle(["dog"]), blank(2), ["dogs", "cats"]) == [1.0, 0.0]


# composition ---------------------------------------------------------------------------------------------


def test_composition_math():
    a, b = const(0.5, 1.0, 0.0, 0.2), const(0.4, 0.0, 0.3, 1.0)
    idx = ["0", "1", "2", "3"]
    assert AllOf(a, b)(blank(4), idx) == pytest.approx([0.2, 0.0, 0.0, 0.2])
    assert AnyOf(a, b)(blank(4), idx) == pytest.approx([0.7, 1.0, 0.3, 1.0])
    assert Not(a)(blank(4), idx) == pytest.approx([0.5, 0.0, 1.0, 0.8])
    expected = [0.5**2 * 0.4**0.5, 0.0, 0.0, 0.2**2]
    assert WeightedProduct([(a, 2), (b, 0.5)])(blank(4), idx) == pytest.approx(expected)
    # weight 1 everywhere is AllOf; weights scale log-values
    assert WeightedProduct([(a, 1), (b, 1)])(blank(4), idx) == pytest.approx([0.2, 0.0, 0.0, 0.2])
    # a floor lifts every value towards 1: inside AllOf a failed check scales the others instead of zeroing them
    assert Floor(a, 0.3)(blank(4), idx) == pytest.approx([0.65, 1.0, 0.3, 0.44])
    assert AllOf(Floor(b, 0.25), a)(blank(4), idx) == pytest.approx([0.275, 0.25, 0.0, 0.2])


def test_composition_skips_decided_samples_and_zero_weights():
    a, b = const(0.0, 1.0, 0.5), const(1.0, 1.0, 1.0)
    assert AllOf(a, b)(blank(3), ["0", "1", "2"]) == [0.0, 1.0, 0.5]
    assert b.calls == [["1", "2"]]  # sample 0 was already 0
    c, d = const(1.0, 0.0), const(0.3, 0.3)
    assert AnyOf(c, d)(blank(2), ["0", "1"]) == pytest.approx([1.0, 0.3])
    assert d.calls == [["1"]]  # sample 0 was already 1

    def never(p, c):
        raise AssertionError("a weight-0 term must not be evaluated")

    assert WeightedProduct([(const(0.25), 1.0), (never, 0)])(blank(1), ["0"]) == [0.25]


def test_composition_errors():
    with pytest.raises(ValueError, match="AllOf needs at least one oracle"):
        AllOf()
    with pytest.raises(TypeError, match="AnyOf: oracle 1 is not callable"):
        AnyOf(const(1.0), 3)
    with pytest.raises(ValueError, match="WeightedProduct needs at least one"):
        WeightedProduct([])
    with pytest.raises(ValueError, match="weight of term 1 must be finite and >= 0, got -1"):
        WeightedProduct([(const(1.0), 1), (const(1.0), -1)])
    with pytest.raises(ValueError, match="weight of term 0 must be finite and >= 0, got nan"):
        WeightedProduct([(const(1.0), math.nan)])
    with pytest.raises(TypeError, match="weight of term 0 must be a number, got True"):
        WeightedProduct([(const(1.0), True)])
    with pytest.raises(TypeError, match=r"term 0 must be an \(oracle, weight\) pair"):
        WeightedProduct([const(1.0)])
    with pytest.raises(ValueError, match=r"Floor: floor must be in \[0, 1\), got 1"):
        Floor(const(0.5), 1)
    with pytest.raises(ValueError, match=r"Floor: floor must be in \[0, 1\), got -0.1"):
        Floor(const(0.5), -0.1)
    with pytest.raises(TypeError, match="Floor: floor must be a number"):
        Floor(const(0.5), "0.3")
    with pytest.raises(TypeError, match="Floor: oracle 0 is not callable"):
        Floor(None, 0.3)
    tokens = CallableOracle(lambda p, c: [1.0] * len(c), on="tokens")
    with pytest.raises(ValueError, match="mixes text-level and token-level oracles"):
        AllOf(KeywordOracle(["dog"]), tokens)


# token level ---------------------------------------------------------------------------------------------


def test_text_oracles_read_token_ids_through_the_tokenizer(gpt2_tokenizer):
    tok = gpt2_tokenizer
    oracle = as_token_oracle(AllOf(coverage_oracle(), Not(RegexOracle("cat"))), tok)
    assert isinstance(oracle, TextOracle)
    prompts = [tok.encode("dog run ="), tok.encode("dog run =")]
    completions = [tok.encode(" The dogs ran.<|endoftext|>"), tok.encode(" The dogs ran after a cat.")]
    assert call_oracle(oracle, prompts, completions) == [1.0, 0.0]


def test_sampling_labels_with_a_text_oracle(gpt2_tokenizer):
    tok = gpt2_tokenizer
    base = tiny_gpt2(vocab_size=len(tok), width=16, layers=1)
    oracle = KeywordOracle(["the", "a"], soft=True)
    samples = dinado.sample(base, [tok.encode("Hello =")], 6, as_token_oracle(oracle, tok), max_new_tokens=5)
    texts = tok.batch_decode(samples.completions, skip_special_tokens=True)
    assert samples.labels.tolist() == oracle(blank(len(texts)), texts)
    assert "KeywordOracle(['the', 'a'], soft=True)" in samples.metadata["oracle"]


# classifier ----------------------------------------------------------------------------------------------

TEXTS = ["I would be delighted to attend.", "", "yo", "gonna be there lol, see ya", "Regards."]


def _classifier(kind):
    torch.manual_seed(0)
    labels = dict(id2label={0: "informal", 1: "formal"}, label2id={"informal": 0, "formal": 1})
    if kind == "gpt2":  # no pad token: one text at a time
        config = GPT2Config(vocab_size=50257, n_embd=16, n_layer=1, n_head=2, n_positions=64, **labels)
        config.initializer_range = 0.5
    else:  # BERT: padded batches with an attention mask
        config = BertConfig(
            vocab_size=50257,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            initializer_range=0.5,
            **labels,
        )
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def classifier(request):
    return _classifier(request.param)


def _reference_probability(model, tok, text, label=1):
    ids = tok(text)["input_ids"] or [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    return torch.softmax(logits.float(), -1)[0, label].item()


def test_classifier_soft_is_the_softmax_of_the_logits(classifier, gpt2_tokenizer):
    expected = [_reference_probability(classifier, gpt2_tokenizer, t) for t in TEXTS]
    oracle = ClassifierOracle(classifier, gpt2_tokenizer, "formal", soft=True, batch_size=2)
    values = oracle(blank(len(TEXTS)), TEXTS)
    assert values == pytest.approx(expected, abs=1e-5)
    assert max(values) - min(values) > 1e-3  # the texts are told apart
    by_index = ClassifierOracle(classifier, gpt2_tokenizer, 0, soft=True)(blank(len(TEXTS)), TEXTS)
    assert by_index == pytest.approx([1 - p for p in expected], abs=1e-5)
    with_prompt = ClassifierOracle(classifier, gpt2_tokenizer, "formal", soft=True, include_prompt=True)
    assert with_prompt(["Dear Sir,"], [" thanks"]) == pytest.approx(
        [_reference_probability(classifier, gpt2_tokenizer, "Dear Sir, thanks")], abs=1e-5
    )


def test_classifier_threshold_and_argmax(classifier, gpt2_tokenizer):
    probs = [_reference_probability(classifier, gpt2_tokenizer, t) for t in TEXTS]
    t = sorted(probs)[2]
    hard = ClassifierOracle(classifier, gpt2_tokenizer, "FORMAL", threshold=t)
    assert hard(blank(len(TEXTS)), TEXTS) == [float(p >= t) for p in probs]
    assert sum(hard(blank(len(TEXTS)), TEXTS)) == 3  # the threshold value itself counts as a pass
    argmax = ClassifierOracle(classifier, gpt2_tokenizer, "formal")
    assert argmax(blank(len(TEXTS)), TEXTS) == [float(p > 0.5) for p in probs]
    assert ClassifierOracle(classifier, gpt2_tokenizer, "formal", threshold=0.0)(blank(1), ["x"]) == [1.0]


def test_classifier_errors(gpt2_tokenizer):
    model = _classifier("bert")
    with pytest.raises(
        ValueError, match=r"unknown label 'polite'; the model's labels are \['informal', 'formal'\]"
    ):
        ClassifierOracle(model, gpt2_tokenizer, "polite")
    with pytest.raises(ValueError, match="label index 2 is out of range: the model has 2 labels"):
        ClassifierOracle(model, gpt2_tokenizer, 2)
    with pytest.raises(ValueError, match="give threshold or soft=True, not both"):
        ClassifierOracle(model, gpt2_tokenizer, 1, threshold=0.5, soft=True)
    with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\], got 1.5"):
        ClassifierOracle(model, gpt2_tokenizer, 1, threshold=1.5)
    with pytest.raises(ValueError, match="cannot be written as a config"):
        ClassifierOracle(model, gpt2_tokenizer, 1).to_config()


def test_classifier_from_pretrained_and_config(tmp_path, gpt2_tokenizer):
    model = _classifier("bert")
    model.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    expected = ClassifierOracle(model, gpt2_tokenizer, "formal", soft=True)(blank(3), TEXTS[:3])
    config = {"type": "classifier", "model": str(tmp_path), "label": "formal", "soft": True, "batch_size": 2}
    oracle = oracle_from_config(config)
    assert isinstance(oracle, ClassifierOracle)
    assert oracle(blank(3), TEXTS[:3]) == pytest.approx(expected, abs=1e-5)
    assert repr(oracle) == f"ClassifierOracle({str(tmp_path)!r}, label='formal' (index 1), soft=True)"
    again = oracle_from_config(oracle.to_config())
    assert again.to_config() == oracle.to_config()
    assert again(blank(3), TEXTS[:3]) == pytest.approx(expected, abs=1e-5)
    loaded = ClassifierOracle.from_pretrained(
        str(tmp_path), "formal", tokenizer=gpt2_tokenizer, threshold=0.5
    )
    assert loaded(blank(3), TEXTS[:3]) == [float(p >= 0.5) for p in expected]


# configs -------------------------------------------------------------------------------------------------


def test_config_builds_every_text_oracle():
    oracle = oracle_from_config(
        {
            "type": "weighted_product",
            "oracles": [
                {"oracle": {"type": "keywords", "keywords": ["dog", "ice cream"]}, "weight": 2},
                {
                    "oracle": {
                        "type": "any_of",
                        "oracles": [
                            {"type": "regex", "pattern": "!$", "flags": ["MULTILINE"]},
                            {"type": "callable", "path": "tests.test_oracles:ends_with_question"},
                        ],
                    },
                    "weight": 0.5,
                },
                {"oracle": {"type": "not", "oracle": {"type": "regex", "pattern": "cat"}}, "weight": 1},
            ],
        }
    )
    texts = ["Dogs love ice cream!", "Dogs love ice cream?", "Dogs love ice cream.", "Dogs, ice cream, cats!"]
    assert oracle(blank(4), texts) == [1.0, 1.0, 0.0, 0.0]
    assert repr(oracle).startswith(
        "WeightedProduct([(KeywordOracle(['dog', 'ice cream'], soft=False), 2), (AnyOf("
    )


def test_config_round_trip():
    config = {
        "type": "all_of",
        "oracles": [
            {"type": "keywords", "keywords": ["dog", "take off"], "soft": True},
            {"type": "keywords", "from_prompt": "commongen", "marker": "=", "sep": ",", "soft": False},
            {"type": "keywords", "from_prompt": "tests.test_oracles:first_word_of_prompt", "soft": False},
            {"type": "regex", "pattern": "^the", "flags": ["IGNORECASE"], "mode": "search", "strip": True},
            {"type": "callable", "path": "tests.test_oracles:completion_length_is_even", "on": "text"},
            {
                "type": "not",
                "oracle": {
                    "type": "regex",
                    "pattern": "xyz",
                    "flags": [],
                    "mode": "fullmatch",
                    "strip": False,
                },
            },
            {
                "type": "any_of",
                "oracles": [{"type": "keywords", "keywords": ["plane"], "soft": False}],
            },
            {
                "type": "weighted_product",
                "oracles": [
                    {"oracle": {"type": "keywords", "keywords": ["dog"], "soft": True}, "weight": 0.5}
                ],
            },
            {
                "type": "floor",
                "oracle": {"type": "keywords", "keywords": ["cat"], "soft": False},
                "floor": 0.25,
            },
        ],
    }
    oracle = oracle_from_config(config)
    assert oracle.to_config() == config
    rebuilt = oracle_from_config(oracle.to_config())
    assert repr(rebuilt) == repr(oracle)
    prompts = ["dog, plane =", "dog, plane ="]
    texts = ["The dog's plane took off", "The dog's plane took off."]
    assert oracle(prompts, texts) == rebuilt(prompts, texts) == [0.25, 0.0]  # no "cat": the floor
    # defaults are filled in
    assert oracle_from_config({"type": "regex", "pattern": "a"}).to_config() == {
        "type": "regex",
        "pattern": "a",
        "flags": [],
        "mode": "search",
        "strip": False,
    }


@pytest.mark.parametrize(
    "config, message",
    [
        (
            {"type": "regexp", "pattern": "a"},
            r"unknown oracle type 'regexp'; valid types: keywords, regex, callable",
        ),
        ({"pattern": "a"}, r"missing key 'type'"),
        (
            {"type": "regex", "patern": "a"},
            r"unknown key 'patern'; valid keys: flags, mode, pattern, strip, type",
        ),
        ({"type": "regex"}, r"missing key 'pattern'"),
        ({"type": "keywords", "keywords": []}, r"empty keyword set"),
        ({"type": "keywords"}, r"exactly one of 'keywords' \(a list\) or 'from_prompt'"),
        ({"type": "keywords", "keywords": "dog"}, r"'keywords' must be a list of strings"),
        (
            {"type": "keywords", "keywords": ["a"], "sep": ","},
            r"'marker' and 'sep' go with from_prompt: commongen",
        ),
        (
            {
                "type": "all_of",
                "oracles": [{"type": "regex", "pattern": "a"}, {"type": "regex", "pattern": "a", "x": 1}],
            },
            r"oracle config.oracles\[1\]: unknown key 'x'",
        ),
        ({"type": "all_of", "oracles": []}, r"AllOf needs at least one oracle"),
        (
            {"type": "weighted_product", "oracles": [{"oracle": {"type": "regex", "pattern": "a"}, "w": 1}]},
            r"oracle config.oracles\[0\]: unknown key 'w'; valid keys: oracle, type, weight",
        ),
        ({"type": "classifier", "model": "x"}, r"missing key 'label'"),
        ({"type": "callable", "path": "nope"}, r"'package.module:function'"),
        ("keywords", r"an oracle config must be a mapping"),
    ],
)
def test_config_errors_name_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        oracle_from_config(config)


def test_reprs_describe_the_oracle():
    assert (
        repr(KeywordOracle(["dog", "ice cream"], soft=True))
        == "KeywordOracle(['dog', 'ice cream'], soft=True)"
    )
    assert repr(coverage_oracle()) == "KeywordOracle(CommonGenConcepts(marker='=', sep=None), soft=False)"
    assert repr(AnyOf(RegexOracle("a"), Not(RegexOracle("b")))) == (
        "AnyOf(RegexOracle('a', flags=0, mode='search'), Not(RegexOracle('b', flags=0, mode='search')))"
    )
    assert repr(TextOracle(KeywordOracle(["dog"]), None)) == "TextOracle(KeywordOracle(['dog'], soft=False))"


def test_classifier_scores_in_eval_mode_even_if_the_model_was_put_back_in_training(gpt2_tokenizer):
    model = _classifier("bert")
    oracle = ClassifierOracle(model, gpt2_tokenizer, "formal", soft=True, batch_size=2)
    expected = [_reference_probability(model, gpt2_tokenizer, t) for t in TEXTS]
    with_dropout(model)  # e.g. a training loop that validates with the oracle between epochs
    model.bert.embeddings.eval()
    modes = [m.training for m in model.modules()]
    torch.manual_seed(0)
    assert oracle(blank(len(TEXTS)), TEXTS) == pytest.approx(expected, abs=1e-5)
    assert [m.training for m in model.modules()] == modes and model.training


# the registry and the template method -------------------------------------------------------------------


class EndsWith(OracleBase):
    """An oracle of a new type: implements only ``_score`` (the base class checks the inputs)."""

    def __init__(self, suffix):
        self.suffix = suffix
        self.scored = []

    def _score(self, prompts, completions):
        self.scored.append(list(completions))
        return [float(c.endswith(self.suffix)) for c in completions]

    def __repr__(self):
        return f"EndsWith({self.suffix!r})"

    def to_config(self):
        return {"type": "ends_with", "suffix": self.suffix}


def build_ends_with(config, where):
    registry.check_keys(config, {"suffix"}, set(), where)
    return EndsWith(config["suffix"])


@pytest.fixture
def scratch_registry(monkeypatch):
    """The registry's table, restored after the test."""
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    return registry._BUILDERS


def test_a_registered_type_round_trips_through_configs(scratch_registry):
    register_oracle("ends_with", build_ends_with)
    oracle = oracle_from_config({"type": "ends_with", "suffix": "?"})
    assert isinstance(oracle, EndsWith) and oracle(blank(2), ["Why?", "No."]) == [1.0, 0.0]
    config = {
        "type": "all_of",
        "oracles": [{"type": "ends_with", "suffix": "?"}, {"type": "regex", "pattern": "W"}],
    }
    nested = oracle_from_config(config)
    assert nested(blank(2), ["Why?", "How?"]) == [1.0, 0.0]
    assert oracle_from_config(nested.to_config()).to_config() == nested.to_config()
    with pytest.raises(
        ValueError, match=r"oracle config.oracles\[0\]: unknown key 'x'; valid keys: suffix, type"
    ):
        oracle_from_config({"type": "all_of", "oracles": [{"type": "ends_with", "suffix": "?", "x": 1}]})


def test_register_oracle_refuses_a_second_builder_a_non_callable_and_a_bad_name(scratch_registry):
    register_oracle("ends_with", build_ends_with)
    register_oracle("ends_with", build_ends_with)  # the same builder again: nothing changes
    with pytest.raises(
        ValueError, match=r"'ends_with' is already registered \(by tests.test_oracles.build_ends_with\)"
    ):
        register_oracle("ends_with", lambda c, where: EndsWith("!"))
    with pytest.raises(ValueError, match="'regex' is already registered"):
        register_oracle("regex", build_ends_with)
    with pytest.raises(
        TypeError, match="the builder of 'shouts' must be callable as builder\\(config, where\\), got 3"
    ):
        register_oracle("shouts", 3)
    with pytest.raises(TypeError, match="the type name must be a non-empty string, got ''"):
        register_oracle("", build_ends_with)
    assert "shouts" not in scratch_registry and scratch_registry["ends_with"] is build_ends_with


def test_an_unknown_type_names_every_known_type(scratch_registry):
    register_oracle("ends_with", build_ends_with)
    with pytest.raises(ValueError) as err:
        oracle_from_config({"type": "shouts"})
    message = str(err.value)
    assert message.startswith(
        "oracle config: unknown oracle type 'shouts'; valid types: keywords, regex, callable, classifier, all_of, "
        "any_of, not, weighted_product, floor, "
    )
    assert set(message.split("valid types: ")[1].split(", ")) == {*registry._BUILDERS, "tv"}


def test_a_task_type_is_imported_by_module_name_and_must_register(monkeypatch, scratch_registry):
    monkeypatch.setitem(registry.TASK_TYPES, "nothing", "json")  # a module that registers no oracle
    with pytest.raises(ValueError, match="unknown oracle type 'nothing'; valid types: .*nothing"):
        oracle_from_config({"type": "nothing"})


def test_the_base_class_checks_the_inputs_once_before_score():
    oracle = EndsWith("?")
    with pytest.raises(ValueError, match="prompts and completions must have the same length; got 1 and 2"):
        oracle(["a"], ["b?", "c"])
    with pytest.raises(TypeError, match=r"completions\[1\] is a list, not a str: .*wrap it in TextOracle"):
        oracle(blank(2), ["b?", [1, 2]])
    assert oracle.scored == []  # _score never saw a bad batch
    assert oracle(blank(2), ["b?", "c"]) == [1.0, 0.0] and oracle.scored == [["b?", "c"]]


def test_the_checks_run_once_per_call(monkeypatch):
    checked = []
    real = oracle_base.check_text
    monkeypatch.setattr(
        oracle_base, "check_text", lambda rows, what: checked.append(what) or real(rows, what)
    )
    oracle = coverage_oracle()
    assert oracle(["dog ="], ["dogs"]) == [1.0]
    assert checked == ["completions", "prompts"]  # the prompts are read: checked too, each once
    checked.clear()
    assert oracle.coverage(["dog ="], ["cats"]) == [[False]]
    assert checked == ["completions", "prompts"]
    checked.clear()
    assert AllOf(RegexOracle("a"), Not(KeywordOracle(["dog"])))(blank(1), ["a cat"]) == [1.0]
    assert checked == ["completions", "completions"]  # by each text-reading part, none by the compositions
    with pytest.raises(TypeError, match="prompts\\[0\\] is a int"):
        coverage_oracle()([1], ["dog"])
