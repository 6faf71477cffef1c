"""dinado.classifier: learning, determinism, save/load, use as a ClassifierOracle, atomic output, bad input."""

import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dinado.classifier import CLASSIFIER_FILE, ClassifierResult, evaluate_classifier, train_classifier
from dinado.oracles import ClassifierOracle, oracle_from_config

from .conftest import SHARED_DATA

torch.set_num_threads(1)

COCOA = SHARED_DATA / "cocoa-mt" / "CoCoA-MT"
LABELS = ("informal", "formal")
FILLER = "the a we meet today at noon near station about plan for trip and call later maybe soon".split()
MARKERS = {"formal": ["sir", "madam", "kindly"], "informal": ["dude", "buddy", "hey"]}
# about a second on one thread (validation accuracy 1.0; at learning_rate=1e-6 it stays at chance, 0.53)
TINY = dict(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, max_length=32, epochs=8, batch_size=16)


def synthetic(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Random filler words with one register marker inserted somewhere: separable by that one word."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = LABELS[i % 2]
        words = rng.choices(FILLER, k=rng.randint(3, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(MARKERS[label]))
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One classifier trained on the synthetic task and saved (with a held-out set scored as validation)."""
    out = tmp_path_factory.mktemp("clf") / "model"
    texts, labels = synthetic(240, seed=0)
    result = train_classifier(
        texts, labels, out, label_names=LABELS, validation=synthetic(100, seed=1), seed=0, **TINY
    )
    return result, out


def test_learns_a_separable_task(trained):
    result, _ = trained
    assert isinstance(result, ClassifierResult)
    assert result.num_train == 240 and result.num_validation == 100
    assert result.validation_accuracy >= 0.95  # chance is 0.5
    held_out = evaluate_classifier(result.model, result.tokenizer, *synthetic(100, seed=2))
    assert held_out["n"] == 100 and held_out["accuracy"] >= 0.95
    assert set(held_out["per_label"]) == set(LABELS)
    assert all(v["n"] == 50 and v["accuracy"] >= 0.9 for v in held_out["per_label"].values())
    assert len(result.history) == TINY["epochs"]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["validation_accuracy"] == result.validation_accuracy
    assert result.wall_seconds > 0 and result.num_parameters > 0 and result.truncated == 0
    assert not result.model.training


def test_tokenizer_is_trained_on_training_texts_and_adds_a_cls_token(trained):
    result, _ = trained
    tokenizer = result.tokenizer
    assert len(tokenizer) <= TINY["vocab_size"]
    ids = tokenizer(["dude", ""])["input_ids"]
    assert ids[0][0] == tokenizer.bos_token_id == result.model.config.pad_token_id
    assert ids[1] == [tokenizer.bos_token_id]  # an empty text is the CLS token alone
    assert tokenizer.decode(tokenizer("hey sir")["input_ids"], skip_special_tokens=True) == "hey sir"


def test_same_seed_same_weights_other_seed_other_weights():
    texts, labels = synthetic(48, seed=3)
    kwargs = dict(label_names=LABELS, **{**TINY, "epochs": 1})
    a = train_classifier(texts, labels, seed=5, **kwargs).model.state_dict()
    b = train_classifier(texts, labels, seed=5, **kwargs).model.state_dict()
    c = train_classifier(texts, labels, seed=6, **kwargs).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_save_and_load_round_trip(trained):
    result, out = trained
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", CLASSIFIER_FILE} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    record = json.loads((out / CLASSIFIER_FILE).read_text())
    assert record["label_names"] == list(LABELS)
    assert record["metrics"]["validation_accuracy"] == result.validation_accuracy
    assert record["hyperparameters"]["hidden_size"] == TINY["hidden_size"]
    assert len(record["history"]) == TINY["epochs"]
    assert result.output_dir == str(out)

    model = AutoModelForSequenceClassification.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "informal", 1: "formal"}
    texts, _ = synthetic(20, seed=4)
    texts.append("")
    assert tokenizer(texts)["input_ids"] == result.tokenizer(texts)["input_ids"]
    before = ClassifierOracle(result.model, result.tokenizer, "formal").logits(texts)
    after = ClassifierOracle(model, tokenizer, "formal").logits(texts)
    assert torch.equal(before, after)


def test_hard_and_soft_oracle(trained):
    result, out = trained
    texts, labels = synthetic(40, seed=5)
    prompts = [""] * len(texts)
    soft = ClassifierOracle.from_pretrained(str(out), "formal", soft=True)(prompts, texts)
    assert all(0.0 < p < 1.0 for p in soft)
    hard = ClassifierOracle.from_pretrained(str(out), "formal", threshold=0.5)(prompts, texts)
    assert hard == [float(p >= 0.5) for p in soft]
    assert sum(h == (y == "formal") for h, y in zip(hard, labels, strict=True)) >= 0.9 * len(texts)
    informal = result.oracle("informal", soft=True)(prompts, texts)  # from the result, in memory
    assert informal == pytest.approx([1 - p for p in soft], abs=1e-6)
    strict = result.oracle("formal", threshold=0.99)(prompts, texts)
    assert all(s <= h for s, h in zip(strict, hard, strict=True))
    config = result.oracle("formal", soft=True).to_config()
    assert config["model"] == str(out)
    assert oracle_from_config(config)(prompts, texts) == pytest.approx(soft, abs=1e-6)


def test_evaluate_takes_names_or_indices_and_checks_them(trained):
    result, _ = trained
    texts, labels = synthetic(10, seed=6)
    by_name = evaluate_classifier(result.model, result.tokenizer, texts, labels)
    by_index = evaluate_classifier(result.model, result.tokenizer, texts, [LABELS.index(y) for y in labels])
    assert by_name == by_index
    with pytest.raises(ValueError, match=r"labels\[0\] is 'polite'"):
        evaluate_classifier(result.model, result.tokenizer, ["x"], ["polite"])
    with pytest.raises(ValueError, match="1 texts but 2 labels"):
        evaluate_classifier(result.model, result.tokenizer, ["x"], ["formal", "formal"])
    with pytest.raises(ValueError, match="no texts"):
        evaluate_classifier(result.model, result.tokenizer, [], [])


def test_given_tokenizer_is_used_as_is(trained):
    result, _ = trained
    texts, labels = synthetic(32, seed=7)
    other = train_classifier(
        texts, labels, label_names=LABELS, tokenizer=result.tokenizer, **{**TINY, "epochs": 1}
    )
    assert other.tokenizer is result.tokenizer
    assert other.model.config.vocab_size == len(result.tokenizer)
    assert "vocab_size" not in other.hyperparameters


def test_output_dir_is_atomic_and_not_overwritten(tmp_path, monkeypatch):
    texts, labels = synthetic(32, seed=8)
    kwargs = dict(label_names=LABELS, **{**TINY, "epochs": 1})
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        train_classifier(texts, labels, out, **kwargs)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    train_classifier(texts, labels, out, overwrite=True, **kwargs)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

    def boom(self):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ClassifierResult, "metrics", boom)  # fails after the temporary directory exists
    deep = tmp_path / "a" / "b" / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        train_classifier(texts, labels, deep, **kwargs)
    assert not (tmp_path / "a").exists()  # nothing left: no partial model, no created parents
    with pytest.raises(RuntimeError, match="disk full"):
        train_classifier(texts, labels, out, overwrite=True, **kwargs)
    assert (out / "model.safetensors").is_file()  # the previous model is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(texts=[], labels=[]), ValueError, "no training texts"),
        (dict(texts="a b", labels=["formal"]), TypeError, "must be a list"),
        (dict(labels=["formal"]), ValueError, "4 training texts but 1 labels"),
        (dict(texts=["a", "b", 3, "d"]), TypeError, r"texts\[2\] must be a str"),
        (dict(labels=["formal", "polite", "formal", "informal"]), ValueError, r"labels\[1\] is 'polite'"),
        (dict(labels=["formal"] * 4), ValueError, "single class"),
        (dict(label_names=("formal",)), ValueError, "at least 2 classes"),
        (dict(label_names="formal"), TypeError, "sequence of class names"),
        (dict(label_names=("formal", "informal", "formal")), ValueError, "duplicates"),
        (dict(validation=(["a"], ["rude"])), ValueError, r"validation labels\[0\] is 'rude'"),
        (dict(validation=(["a"],)), TypeError, "validation must be a"),
        (dict(epochs=0), ValueError, "epochs must be an int >= 1"),
        (dict(batch_size=2.5), ValueError, "batch_size must be an int"),
        (dict(hidden_size=30, num_heads=4), ValueError, "divisible by num_heads"),
        (dict(learning_rate=0), ValueError, "learning_rate must be"),
        (dict(learning_rate=float("nan")), ValueError, "learning_rate must be"),
        (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\)"),
        (dict(max_length=1), ValueError, "max_length must be an int >= 2"),
        (dict(vocab_size=100), ValueError, "vocab_size must be >= 258"),
        (dict(seed=True), ValueError, "seed must be an int"),
    ],
)
def test_bad_input(change, error, match, tmp_path):
    args = dict(texts=["a b", "c d", "e f", "g h"], labels=["formal", "informal"] * 2, label_names=LABELS)
    args.update(change)
    texts, labels = args.pop("texts"), args.pop("labels")
    with pytest.raises(error, match=match):
        train_classifier(texts, labels, tmp_path / "out", **{**TINY, **args})
    assert not (tmp_path / "out").exists()


def test_cocoa_german_formality(tmp_path):
    """Trained on CoCoA-MT en-de train (hyperparameters chosen on a train-carved validation split), scored
    once on the test split's 1,200 references; docs/oracles.md has the numbers."""
    from dinado.tasks.formality import load_cocoa, train_formality_classifier

    if not COCOA.is_dir():
        pytest.skip(f"{COCOA} is not present")
    with pytest.raises(ValueError, match="validation_fraction"):
        train_formality_classifier(COCOA, "en-de", validation_fraction=1.0)
    with pytest.raises(TypeError, match="sets label_names itself"):
        train_formality_classifier(COCOA, "en-de", label_names=("a", "b"))
    result = train_formality_classifier(COCOA, "en-de", tmp_path / "de", **COCOA_DE)
    assert result.num_train == 2 * 377  # segments with identical references are left out
    test = load_cocoa(COCOA, "en-de", "test")
    texts = [e.formal for e in test] + [e.informal for e in test]
    labels = ["formal"] * len(test) + ["informal"] * len(test)
    oracle = ClassifierOracle.from_pretrained(str(tmp_path / "de"), "formal", threshold=0.5)
    hard = oracle([""] * len(texts), texts)
    accuracy = sum(h == (y == "formal") for h, y in zip(hard, labels, strict=True)) / len(texts)
    assert accuracy >= COCOA_DE_MIN_ACCURACY, accuracy


# The defaults but width 32 and one layer: 0.989 on a 20% train-carved validation split (mean of 3 splits,
# the defaults 0.991), about 7 s to train; measured once on test afterwards: 0.992 (1,190/1,200).
COCOA_DE = dict(hidden_size=32, num_layers=1)
COCOA_DE_MIN_ACCURACY = 0.95
