import pytest

from dinado.oracles import KeywordOracle, oracle_from_config
from dinado.tasks.commongen import (
    CommonGenConcepts,
    caption_metrics,
    commongen_metrics,
    coverage_oracle,
    finished_check,
    format_prompt,
    is_finished,
    is_loop,
    is_sentence,
    is_word_list,
    load_pairs,
    load_split,
    sentence_check,
)

from .conftest import SHARED_DATA

DATA = SHARED_DATA / "commongen" / "v1.1_LHRYANG"


@pytest.fixture(scope="module")
def dev():
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not present")
    return load_split(DATA, "dev")


def test_splits_have_the_documented_sizes(dev):
    assert len(dev) == 992 and sum(len(s.references) for s in dev) == 4018  # SOURCE.md
    test = load_split(DATA, "test")
    assert len(test) == 1497 and sum(len(s.references) for s in test) == 6042
    assert {len(s.concepts) for s in test} == {4, 5}


def test_prompt_format_and_grouping(tmp_path):
    (tmp_path / "s.txt").write_text("dog frisbee catch\ncatch dog frisbee\nski mountain\n")
    (tmp_path / "t.txt").write_text("A dog catches a frisbee.\nThe dog caught it.\nWe ski on the mountain.\n")
    sets = load_pairs(tmp_path / "s.txt", tmp_path / "t.txt")
    assert [s.prompt for s in sets] == ["dog frisbee catch =", "ski mountain ="]
    assert sets[0].references == ["A dog catches a frisbee.", "The dog caught it."]
    assert format_prompt(["a", "b"]) == "a b ="


def test_bad_files_are_named(tmp_path):
    (tmp_path / "s.txt").write_text("a b\nc d\n")
    (tmp_path / "t.txt").write_text("x\n")
    with pytest.raises(ValueError, match="has 2 lines but .*t.txt has 1"):
        load_pairs(tmp_path / "s.txt", tmp_path / "t.txt")
    with pytest.raises(FileNotFoundError, match="missing_src.txt not found"):
        load_pairs(tmp_path / "missing_src.txt", tmp_path / "t.txt")
    with pytest.raises(ValueError, match="unknown CommonGen split 'val'"):
        load_split(tmp_path, "val")


def test_keywords_per_sample_from_commongen_prompts():
    oracle = coverage_oracle(soft=True)
    prompts = [
        "dog frisbee catch =",
        "cat sofa sleep = The cat sleeps on the sofa.\nski mountain snow =",  # few-shot: the last line counts
    ]
    completions = ["The dog caught a frisbee.", "We skied down the snowy mountain slopes."]
    assert oracle.keywords_for(prompts) == [("dog", "frisbee", "catch"), ("ski", "mountain", "snow")]
    assert oracle.coverage(prompts, completions) == [[True, True, True], [True, True, False]]
    assert oracle(prompts, completions) == [1.0, pytest.approx(2 / 3)]


def test_commongen_parser_options():
    assert CommonGenConcepts()("dog frisbee catch =") == ["dog", "frisbee", "catch"]
    assert CommonGenConcepts(sep=",")("ice cream, dog =") == ["ice cream", "dog"]
    assert CommonGenConcepts(marker=None)("a b") == ["a", "b"]
    assert CommonGenConcepts(marker="->")("x y -> ") == ["x", "y"]
    with pytest.raises(ValueError, match="has no '=' marker"):
        CommonGenConcepts()("dog frisbee")
    oracle = coverage_oracle(sep=",")
    assert oracle(["ice cream, dog ="], ["The dog licked the ice cream."]) == [1.0]
    assert oracle(["ice cream, dog ="], ["The dog licked the cream."]) == [0.0]


def test_the_concept_reader_is_written_as_a_keywords_config():
    oracle = coverage_oracle(soft=True, sep=",")
    config = {"type": "keywords", "from_prompt": "commongen", "marker": "=", "sep": ",", "soft": True}
    assert oracle.to_config() == config
    rebuilt = oracle_from_config(config)
    assert isinstance(rebuilt, KeywordOracle) and isinstance(rebuilt.from_prompt, CommonGenConcepts)
    assert repr(rebuilt) == repr(oracle) == "KeywordOracle(CommonGenConcepts(marker='=', sep=','), soft=True)"
    assert rebuilt(["ice cream, dog ="], ["The dog licked the cream."]) == [0.5]


def test_caption_metrics_reward_the_references_and_report_spice_unavailable():
    refs = [
        ["A dog catches a frisbee in the park .", "The dog caught the frisbee ."],
        ["A man is riding a horse on the beach ."],
    ]
    perfect = caption_metrics([r[0] for r in refs], refs)
    poor = caption_metrics(["Birds fly south in winter .", "It is raining again today ."], refs)
    assert perfect["bleu4"] > 0.99 and perfect["rouge_l"] > 0.99 and perfect["meteor"] > 0.9
    for key in ("bleu4", "cider", "meteor", "rouge_l"):
        assert poor[key] < perfect[key], key
    assert perfect["spice"] is None and poor["spice"] is None


def test_without_java_meteor_is_not_available_and_the_rest_is_scored(monkeypatch):
    import shutil

    refs = [["A dog catches a frisbee in the park ."]]
    with_java = caption_metrics(["A dog catches a frisbee ."], refs)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.warns(UserWarning, match="METEOR needs Java"):
        without = caption_metrics(["A dog catches a frisbee ."], refs)
    assert without["meteor"] is None and with_java["meteor"] > 0
    for key in ("bleu4", "cider", "rouge_l"):
        assert without[key] == pytest.approx(with_java[key]), key


def test_commongen_metrics_count_inflected_concepts(dev):
    sets = dev[:2]
    outputs = [sets[0].references[0], "nothing relevant here ."]
    m = commongen_metrics(sets, outputs)
    assert m["success"] == 0.5  # the reference covers its own concepts, the second output none
    assert 0 < m["coverage"] < 1


def test_word_lists_are_counted_and_do_not_count_as_sentence_success(dev):
    sets = dev[:2]
    concepts = sets[1].concepts
    listed = ", ".join(concepts) + ", and, the, a, " + ", ".join(concepts)  # covers every concept, as a list
    assert is_word_list(listed) and not is_word_list(sets[0].references[0])
    assert not is_word_list("one, two, three, four words in a longer sentence that reads on and on as prose")
    m = commongen_metrics(sets, [sets[0].references[0], listed])
    assert m["success"] == pytest.approx(1.0) and m["word_lists"] == pytest.approx(0.5)
    assert m["sentence_success"] == pytest.approx(0.5)  # the list covers its concepts but is not a sentence


@pytest.mark.parametrize(
    "text, loop",
    [
        ("A kid dances every dance dance dance at the party", True),
        ("Talk Talk Wear Wear Talk Talk Talk", True),
        ("he climbs the wall, the wall, the wall and talks", True),  # a two-word run, punctuation ignored
        ("The cat sat on the couch next to the pet", False),
        (
            "A dog runs, and a dog barks, while a dog sleeps",
            False,
        ),  # repeated, but never three times in a row
        ("very very good", False),
    ],
)
def test_repetition_loops_are_found_and_sentences_are_not(text, loop):
    assert is_loop(text) is loop and is_sentence(text) is (not loop)


def test_loops_are_counted_and_do_not_count_as_sentence_success(dev):
    sets = dev[:2]
    looped = (
        " ".join(sets[1].concepts) + " " + " ".join([sets[1].concepts[-1]] * 4)
    )  # every concept, then a loop
    assert not is_loop(sets[0].references[0])
    m = commongen_metrics(sets, [sets[0].references[0], looped])
    assert m["success"] == pytest.approx(1.0) and m["loops"] == pytest.approx(0.5) and m["word_lists"] == 0.0
    assert m["sentence_success"] == pytest.approx(0.5)
    assert coverage_oracle(sentences_only=True)([sets[1].prompt], [looped]) == [0.0]
    with pytest.raises(ValueError, match="times must be at least 2"):
        is_loop("a a a", times=1)


def test_a_sentences_only_oracle_gives_word_lists_zero_and_round_trips_its_config(dev):
    s = dev[1]
    listed = ", ".join(s.concepts) + ", and, the, a, " + ", ".join(s.concepts)
    half = " ".join(s.concepts[:1]) + " is here."
    prompts = [s.prompt] * 3
    plain = coverage_oracle(soft=True)(prompts, [s.references[0], listed, half])
    strict = coverage_oracle(soft=True, sentences_only=True)
    values = strict(prompts, [s.references[0], listed, half])
    assert plain[1] == pytest.approx(1.0) and values[1] == 0.0  # covers every concept, but as a list
    assert values[0] == pytest.approx(plain[0]) and values[2] == pytest.approx(plain[2]) and 0 < values[2] < 1
    assert coverage_oracle(sentences_only=True)(prompts[:1], [listed]) == [0.0]
    again = oracle_from_config(strict.to_config())
    assert again(prompts, [s.references[0], listed, half]) == pytest.approx(values)
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        sentence_check(prompts[:2], [listed])


class _FakeDatasets:
    """Stands in for the `datasets` package: records the call and returns rows shaped like common_gen's."""

    def __init__(self, rows=None, error=None):
        self.rows, self.error, self.calls = rows, error, []

    def load_dataset(self, name, split, **kwargs):
        self.calls.append((name, split, kwargs))
        if self.error is not None:
            raise self.error
        return self.rows


def test_load_hf_groups_rows_and_maps_split_names(monkeypatch):
    from dinado.tasks.commongen import load_hf

    rows = [
        {
            "concept_set_idx": 0,
            "concepts": ["ski", "mountain", "skier"],
            "target": "Skier skis down the mountain",
        },
        {
            "concept_set_idx": 0,
            "concepts": ["ski", "mountain", "skier"],
            "target": " A skier on a mountain. ",
        },
        {"concept_set_idx": 1, "concepts": ["dog", "wag", "tail"], "target": ""},
    ]
    fake = _FakeDatasets(rows)
    monkeypatch.setitem(__import__("sys").modules, "datasets", fake)
    sets = load_hf("dev", cache_dir="/tmp/cache")
    assert fake.calls == [("allenai/common_gen", "validation", {"cache_dir": "/tmp/cache"})]
    assert [s.prompt for s in sets] == ["ski mountain skier =", "dog wag tail ="]
    assert sets[0].references == ["Skier skis down the mountain", "A skier on a mountain."]
    assert sets[1].references == []  # the hub's test split has no targets


def test_load_hf_offline_and_missing_package_errors(monkeypatch):
    import sys

    from dinado.tasks.commongen import load_hf

    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets(error=ConnectionError("no network")))
    with pytest.raises(RuntimeError, match="could not load .*allenai/common_gen.*no network.*load_split"):
        load_hf("train")
    with pytest.raises(ValueError, match="unknown CommonGen split 'val'"):
        load_hf("val")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'dinado\[hf\]'"):
        load_hf("dev")


@pytest.mark.parametrize(
    "text, finished",
    [
        ("A dog runs in the park.", True),
        ('He said "hello."', True),
        ("Is it raining?  ", True),
        ("What a day!)", True),
        ("A dog runs in the park and then the", False),
        ("dog, park, run", False),
        ("", False),
    ],
)
def test_an_output_is_finished_when_it_ends_its_sentence(text, finished):
    assert is_finished(text) is finished


def test_a_finished_only_oracle_gives_cut_off_completions_zero_or_a_weight_and_round_trips_its_config(dev):
    s = dev[1]
    whole = s.references[0].rstrip(".!? ") + "."
    cut = s.references[0].rstrip(".!? ") + " and then the"  # covers as much, but the token limit cut it
    prompts = [s.prompt] * 2
    plain = coverage_oracle(soft=True)(prompts, [whole, cut])
    strict = coverage_oracle(soft=True, finished_only=True)
    assert plain[1] > 0 and strict(prompts, [whole, cut]) == [pytest.approx(plain[0]), 0.0]
    assert oracle_from_config(strict.to_config())(prompts, [whole, cut]) == pytest.approx([plain[0], 0.0])
    both = coverage_oracle(soft=True, sentences_only=True, finished_only=True)
    listed = ", ".join(s.concepts) + ", and, the, a, " + ", ".join(s.concepts) + "."  # finished, but a list
    assert both([s.prompt] * 3, [whole, cut, listed]) == [pytest.approx(plain[0]), 0.0, 0.0]
    softer = coverage_oracle(soft=True, finished_only=True, unfinished_weight=0.3)  # a penalty, not a zero
    assert softer(prompts, [whole, cut]) == pytest.approx([plain[0], 0.3 * plain[1]])
    assert oracle_from_config(softer.to_config())(prompts, [whole, cut]) == pytest.approx(
        [plain[0], 0.3 * plain[1]]
    )
    with pytest.raises(ValueError, match="unfinished_weight only applies with finished_only=True"):
        coverage_oracle(soft=True, unfinished_weight=0.3)
    with pytest.raises(ValueError, match=r"unfinished_weight must be in \[0, 1\), got 1"):
        coverage_oracle(soft=True, finished_only=True, unfinished_weight=1)
    assert finished_check(prompts, [whole, cut]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 prompts for 1 completions"):
        finished_check(prompts, [whole])
    m = commongen_metrics([dev[0], s, s], [dev[0].references[0].rstrip(".!? ") + ".", cut, cut])
    assert m["unfinished"] == pytest.approx(2 / 3)
