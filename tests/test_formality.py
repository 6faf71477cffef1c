from collections import Counter

import pytest

from dinado.tasks.formality import (
    FormalityExample,
    TVOracle,
    load_cocoa,
    strip_markers,
    tv_accuracy,
    tv_cues,
    tv_register,
)

from .conftest import SHARED_DATA

COCOA = SHARED_DATA / "cocoa-mt" / "CoCoA-MT"


@pytest.fixture(scope="module")
def root():
    if not COCOA.is_dir():
        pytest.skip(f"{COCOA} is not present")
    return COCOA


# ----------------------------------------------------------------------------------------------------------
# loading


@pytest.mark.parametrize(
    "pair, split, sizes",
    [
        ("en-de", "train", {"telephony": 200, "topical_chat": 200}),
        ("en-es", "train", {"telephony": 200, "topical_chat": 200}),
        ("en-de", "test", {"call_center": 200, "telephony": 200, "topical_chat": 200}),
        ("en-es", "test", {"call_center": 200, "telephony": 200, "topical_chat": 200}),
        ("en-ja", "train", {"telephony": 500, "topical_chat": 500}),  # sources without .en, refs without .ja
        ("en-ja", "test", {"call_center": 199, "telephony": 195, "topical_chat": 200}),
        ("en-pt", "test", {"call_center": 200, "telephony": 200, "topical_chat": 199}),  # file tag en-ptpt
    ],
)
def test_sizes_and_domains_match_source_md(root, pair, split, sizes):
    examples = load_cocoa(root, pair, split)
    assert Counter(e.domain for e in examples) == sizes
    assert [e.domain for e in examples] == sorted(e.domain for e in examples)  # domain by domain
    assert all(isinstance(e, FormalityExample) and e.source and e.formal and e.informal for e in examples)


def test_segments_are_aligned_and_identical_pairs_only_in_train(root):
    train = load_cocoa(root, "en-de", "train")
    first = train[0]  # first line of the telephony files
    assert first.domain == "telephony"
    assert first.source.startswith("It needs to be the culture of customer service")
    assert first.formal.startswith("Es muss eine Kundenservice-Kultur sein")
    assert sum(e.formal == e.informal for e in train) == 23
    test = load_cocoa(root, "en-de", "test")
    assert all(e.formal != e.informal for e in test)  # the README: all test pairs differ
    assert test[0] == FormalityExample(  # sorted domains: call_center comes first
        "Okay, awesome! And where would you like me to send your new card?",
        "Okay, fantastisch! Und wohin soll ich Ihre neue Karte schicken?",
        "Okay, fantastisch! Und wohin soll ich deine neue Karte schicken?",
        "call_center",
    )


def test_domains_filter_keeps_the_requested_order(root):
    only = load_cocoa(root, "en-es", "test", domains="call_center")
    assert len(only) == 200 and {e.domain for e in only} == {"call_center"}
    two = load_cocoa(root, "en-es", "test", domains=["topical_chat", "telephony"])
    assert [e.domain for e in two] == ["topical_chat"] * 200 + ["telephony"] * 200
    everything = load_cocoa(root, "en-es", "test")
    assert two[:200] == [e for e in everything if e.domain == "topical_chat"]


@pytest.mark.parametrize("pair", ["en-de", "en-es"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_annotated_references_equal_the_plain_ones_after_strip_markers(root, pair, split):
    plain = load_cocoa(root, pair, split)
    annotated = load_cocoa(root, pair, split, annotated=True)
    assert len(annotated) == len(plain)
    assert sum("[F]" in e.formal for e in annotated) > len(annotated) // 2
    assert not any("[F]" in e.formal or "[/F]" in e.informal for e in plain)
    for a, p in zip(annotated, plain, strict=True):
        assert a.source == p.source and a.domain == p.domain
        assert strip_markers(a.formal) == p.formal
        assert strip_markers(a.informal) == p.informal


def test_strip_markers():
    assert strip_markers("Wie [F]geht es Ihnen[/F]? [F]Sie[/F]") == "Wie geht es Ihnen? Sie"
    assert strip_markers("no markers") == "no markers"


def test_unknown_split_pair_and_domain_list_what_is_on_disk(root):
    with pytest.raises(
        ValueError, match=r"unknown CoCoA-MT split 'dev'.*train, test.*found in .*: test, train"
    ):
        load_cocoa(root, "en-de", "dev")
    with pytest.raises(ValueError, match=r"unknown CoCoA-MT language pair 'en-xx' for train.*en-de, en-es"):
        load_cocoa(root, "en-xx", "train")
    with pytest.raises(
        ValueError, match=r"unknown domain 'call_center' for en-de train: available: telephony"
    ):
        load_cocoa(root, "en-de", "train", domains=["call_center"])
    with pytest.raises(ValueError, match=r"unknown CoCoA-MT language pair '\.\./train/en-de'"):
        load_cocoa(root, "../train/en-de", "test")
    with pytest.raises(ValueError, match="domains is empty"):
        load_cocoa(root, "en-de", "train", domains=[])


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _fake_corpus(tmp_path, suffix=".de", source_suffix=".en"):
    pair_dir = tmp_path / "CoCoA-MT" / "train" / "en-de"
    pair_dir.mkdir(parents=True)
    stem = pair_dir / "formality-control.train.telephony.en-de"
    _write(stem.with_name(stem.name + source_suffix), ["How are you?", "It rains."])
    _write(stem.with_name(stem.name + ".formal" + suffix), ["Wie geht es Ihnen?", "Es regnet."])
    _write(stem.with_name(stem.name + ".informal" + suffix), ["Wie geht es dir?", "Es regnet."])
    _write(
        stem.with_name(stem.name + ".formal.annotated" + suffix), ["Wie geht es [F]Ihnen[/F]?", "Es regnet."]
    )
    _write(
        stem.with_name(stem.name + ".informal.annotated" + suffix), ["Wie geht es [F]dir[/F]?", "Es regnet."]
    )
    return tmp_path / "CoCoA-MT", stem


@pytest.mark.parametrize("suffix, source_suffix", [(".de", ".en"), ("", "")])
def test_both_file_name_styles_load(tmp_path, suffix, source_suffix):
    root, _ = _fake_corpus(tmp_path, suffix, source_suffix)
    assert load_cocoa(root, "en-de", "train") == [
        FormalityExample("How are you?", "Wie geht es Ihnen?", "Wie geht es dir?", "telephony"),
        FormalityExample("It rains.", "Es regnet.", "Es regnet.", "telephony"),
    ]
    assert load_cocoa(root, "en-de", "train", annotated=True)[0].formal == "Wie geht es [F]Ihnen[/F]?"


def test_files_of_different_lengths_are_named_with_their_counts(tmp_path):
    root, stem = _fake_corpus(tmp_path)
    _write(stem.with_name(stem.name + ".informal.de"), ["Wie geht es dir?"])
    with pytest.raises(
        ValueError, match=r"telephony\.en-de\.en has 2 lines but .*telephony\.en-de\.informal\.de has 1"
    ):
        load_cocoa(root, "en-de", "train")
    assert len(load_cocoa(root, "en-de", "train", annotated=True)) == 2  # the annotated files are parallel


def test_missing_files_are_named(tmp_path):
    root, stem = _fake_corpus(tmp_path)
    stem.with_name(stem.name + ".informal.annotated.de").unlink()
    assert len(load_cocoa(root, "en-de", "train")) == 2
    with pytest.raises(
        FileNotFoundError, match=r"informal annotated file: .*telephony\.en-de\.informal\.annotated"
    ):
        load_cocoa(root, "en-de", "train", annotated=True)
    stem.with_name(stem.name + ".en").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing CoCoA-MT source file: .*telephony\.en-de\[\.en\]"):
        load_cocoa(root, "en-de", "train")
    with pytest.raises(FileNotFoundError, match="CoCoA-MT directory .*nowhere not found"):
        load_cocoa(tmp_path / "nowhere", "en-de", "train")
    (root / "test" / "en-de").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no formality-control\.test\.\* files in .*en-de"):
        load_cocoa(root, "en-de", "test")


# ----------------------------------------------------------------------------------------------------------
# the T-V check


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Können Sie mir helfen?", "formal"),
        ("Kannst du mir helfen?", "informal"),
        ("Sie sind nett.", None),  # sentence-initial: she/they are nice, or formal you
        ("Ihr Vater ist nett.", None),  # her/their/your father
        ("Ich glaube, Sie sind nett.", "formal"),
        ("Das ist gut. Sie wuchs in Budapest auf.", None),
        ("Ich gebe Ihnen das Buch, es ist Ihres.", "formal"),
        ("Wie war Ihre Reise? Erzählen Sie mal!", "formal"),
        ("Wie geht es deiner Mutter?", "informal"),
        ("Du bist toll.", "informal"),  # sentence-initial does not matter for du
        ("Ich habe ihr Buch gelesen.", None),  # lower-case ihr: her
        ("Habt ihr Zeit?", "informal"),  # ihr with a 2nd-person-plural verb
        ("Ihr seid spät dran.", "informal"),
        ("Passt auf euch auf.", "informal"),
        ("Du meine Güte! Mögen Sie Jazz?", "formal"),  # an interjection, not address
        ("Sie sagte, dass sie kommt.", None),
        ("Danke, dass Sie angerufen haben, und grüß deine Schwester.", None),  # both registers
        ("Das Wetter ist schön.", None),
        ("„Sie kommen morgen“, sagte er.", None),  # initial after an opening quote
    ],
)
def test_german(text, expected):
    assert tv_register(text, "de") == expected, tv_cues(text, "de")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("¿Puede usted ayudarme?", "formal"),
        ("¿Me puedes ayudar?", "informal"),
        ("Hola, ¿cómo estás?", "informal"),
        ("Hola, ¿cómo está?", None),  # he/she is, or formal you: no cue
        ("¿Cuál es su película favorita?", None),  # su: his/her/their/your
        ("Es para usted.", "formal"),
        ("Gracias a Ud. por todo.", "formal"),
        ("Ya sabe, así son las cosas.", "formal"),
        ("Ya sabes, así son las cosas.", "informal"),
        ("Te llamo mañana.", "informal"),
        ("Esto es para ti.", "informal"),
        ("¿Vienes conmigo o voy contigo?", "informal"),
        ("¿Qué aprendiste en la escuela?", "informal"),  # preterite ending
        ("Estoy triste, existe un problema.", None),  # -iste words that are not preterites
        ("Quiero preguntarte algo.", "informal"),  # infinitive + te
        ("El arte y el deporte le importan.", None),  # nouns ending like infinitive + te
        ("¿Vosotros habláis español?", "informal"),
        ("Dígame, ¿en qué puedo ayudarle?", "formal"),
        ("Usted sabe que tú tienes razón.", None),  # both registers
        ("El tren llega a las tres.", None),
    ],
)
def test_spanish(text, expected):
    assert tv_register(text, "es") == expected, tv_cues(text, "es")


def test_cues_name_the_words_and_decomposed_accents_are_normalised():
    assert tv_cues("Können Sie mir Ihr Auto leihen?", "de") == {"formal": ["Sie", "Ihr"], "informal": []}
    decomposed = "Hola, ¿co\u0301mo esta\u0301s?"  # "á" as a + combining acute accent
    assert tv_register(decomposed, "es") == "informal"


def test_unsupported_language_and_non_text():
    with pytest.raises(ValueError, match=r"unsupported language 'fr'.*supported: de, es"):
        tv_register("Pouvez-vous m'aider ?", "fr")
    with pytest.raises(TypeError, match="expected a str"):
        tv_register(["Du"], "de")


def test_oracle_values_targets_and_neutral():
    completions = ["Können Sie mir helfen?", "Kannst du mir helfen?", "Das Wetter ist schön."]
    prompts = ["Can you help me?"] * 3
    assert TVOracle("de")(prompts, completions) == [1.0, 0.0, 0.0]
    assert TVOracle("de", target="informal")(prompts, completions) == [0.0, 1.0, 0.0]
    assert TVOracle("de", target="informal", neutral=0.5)(prompts, completions) == [0.0, 1.0, 0.5]
    spanish = TVOracle("es", "formal", neutral=0.25)
    assert spanish(["", "", ""], ["¿Puede usted ayudarme?", "¿Me puedes ayudar?", "¿Me puede ayudar?"]) == [
        1.0,
        0.0,
        0.25,
    ]


def test_oracle_conventions_and_bad_arguments():
    oracle = TVOracle("es", "informal", neutral=0.5)
    assert TVOracle.level == "text" and oracle.level == "text"
    assert repr(oracle) == "TVOracle(lang='es', target='informal', neutral=0.5)"
    assert oracle.to_config() == {"type": "tv", "lang": "es", "target": "informal", "neutral": 0.5}
    from dinado.oracles import oracle_from_config

    rebuilt = oracle_from_config(oracle.to_config())
    assert isinstance(rebuilt, TVOracle) and repr(rebuilt) == repr(oracle)
    assert oracle_from_config({"type": "tv", "lang": "de"})([""], ["Kannst du das?"]) == [0.0]
    with pytest.raises(ValueError, match=r"oracle config: target must be 'formal' or 'informal'"):
        oracle_from_config({"type": "tv", "lang": "de", "target": "polite"})
    with pytest.raises(ValueError, match="target must be 'formal' or 'informal', got 'polite'"):
        TVOracle("de", target="polite")
    with pytest.raises(ValueError, match="unsupported language 'it'"):
        TVOracle("it")
    with pytest.raises(ValueError, match=r"neutral must be finite and in \[0, 1\], got 2"):
        TVOracle("de", neutral=2)
    with pytest.raises(TypeError, match="neutral must be a number"):
        TVOracle("de", neutral="0.5")
    with pytest.raises(ValueError, match="same length"):
        oracle(["a"], ["b", "c"])
    with pytest.raises(TypeError, match="reads decoded text"):
        oracle([[1, 2]], [[3, 4]])


def test_the_tv_type_is_registered_by_its_module_and_loaded_by_name_on_first_use(monkeypatch):
    """The core imports no task: a `tv` config imports dinado.tasks.formality by name, which registers `tv`."""
    import sys

    import dinado.tasks
    from dinado.oracles import oracle_from_config, registry

    assert registry._BUILDERS["tv"].__module__ == "dinado.tasks.formality"
    monkeypatch.setattr(registry, "_BUILDERS", {k: v for k, v in registry._BUILDERS.items() if k != "tv"})
    monkeypatch.setattr(dinado.tasks, "formality", sys.modules["dinado.tasks.formality"])  # restored after
    monkeypatch.delitem(sys.modules, "dinado.tasks.formality")
    oracle = oracle_from_config({"type": "tv", "lang": "de", "target": "informal"})
    fresh = sys.modules["dinado.tasks.formality"]  # imported again, by the registry
    assert type(oracle) is fresh.TVOracle and registry._BUILDERS["tv"] is fresh._build_tv
    assert oracle([""], ["Kannst du das?"]) == [1.0]


def test_tv_accuracy_counts():
    texts = ["Können Sie kommen?", "Kommst du?", "Kommst du?", "Es regnet."]
    result = tv_accuracy(texts, ["formal", "informal", "formal", "informal"], "de")
    assert result == {
        "n": 4,
        "decided": 3,
        "correct": 2,
        "wrong": 1,
        "undecided": 1,
        "accuracy": pytest.approx(2 / 3),
        "coverage": 0.75,
        "strict_accuracy": 0.5,
    }
    assert tv_accuracy(["Es regnet."], ["formal"], "de")["accuracy"] is None
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        tv_accuracy(["a", "b"], ["formal"], "de")
    with pytest.raises(ValueError, match=r"labels\[0\] is 'polite'"):
        tv_accuracy(["a"], ["polite"], "de")
    with pytest.raises(ValueError, match="no texts"):
        tv_accuracy([], [], "de")


# Measured once on the CoCoA-MT test references (rules chosen on train only; see the module docstring):
#   de formal 1.000 / 0.975, de informal 1.000 / 0.993, es formal 0.993 / 0.252, es informal 1.000 / 0.957
# (accuracy among decided / coverage). The floors below are those values minus a 0.02 margin: this test
# catches regressions of the rules, it is not a target to tune them against.
MARGIN = 0.02
MEASURED = {
    ("de", "formal"): (1.000, 0.975),
    ("de", "informal"): (1.000, 0.993),
    ("es", "formal"): (0.993, 0.252),
    ("es", "informal"): (1.000, 0.957),
}


@pytest.mark.parametrize("lang, register", sorted(MEASURED))
def test_accuracy_on_the_test_references_does_not_regress(root, lang, register):
    examples = load_cocoa(root, f"en-{lang}", "test")
    texts = [getattr(e, register) for e in examples]
    result = tv_accuracy(texts, [register] * len(texts), lang)
    accuracy, coverage = MEASURED[lang, register]
    assert result["n"] == 600
    assert result["accuracy"] >= accuracy - MARGIN, result
    assert result["coverage"] >= coverage - MARGIN, result
