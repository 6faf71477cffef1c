"""dinado.pretrain: tokenizer, data reading, training with early stopping, saving, determinism, bad input."""

import json
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from dinado.pretrain import (
    EOS_TOKEN,
    PretrainConfig,
    build_tokenizer,
    pretrain,
    read_pairs,
    read_text_lines,
)
from dinado.pretrain import data as pt_data
from dinado.pretrain import loop as pt_loop
from dinado.pretrain import model as pt_model

COMMONGEN = Path("/work/shared/data/commongen/v1.1_LHRYANG")

WORDS_A = "the cat sat on a mat and ate fish near the big red barn".split()
WORDS_B = "zebras quickly jumped over lazy foxes while owls hooted".split()

# Tiny model and tokenizer: every run below takes about a second on one thread.
TINY = dict(
    vocab_size=300,
    n_layer=1,
    n_embd=32,
    n_head=2,
    context=32,
    batch_size=16,
    max_epochs=None,
    eval_every=10,
)


def sentences(words, n, seed, k=8):
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=k)) + "." for _ in range(n)]


def write_lines(path, lines):
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def pairs_files(tmp_path_factory):
    """300 CommonGen pairs when the shared data is there, else generated prompt/target pairs."""
    d = tmp_path_factory.mktemp("pairs")
    if (COMMONGEN / "train_src.txt").exists():
        src = (COMMONGEN / "train_src.txt").read_text(encoding="utf-8").splitlines()[:300]
        tgt = (COMMONGEN / "train_trg.txt").read_text(encoding="utf-8").splitlines()[:300]
    else:
        rng = random.Random(0)
        src, tgt = [], []
        for _ in range(300):
            concepts = rng.sample(WORDS_A, 3)
            src.append(" ".join(concepts))
            tgt.append(f"The {concepts[0]} and the {concepts[1]} near a {concepts[2]}.")
    return write_lines(d / "src.txt", src), write_lines(d / "tgt.txt", tgt)


@pytest.fixture(scope="module")
def trained_pairs(pairs_files, tmp_path_factory):
    """One tiny pairs run shared by the save/load and loss tests."""
    src, tgt = pairs_files
    out = tmp_path_factory.mktemp("runs") / "pairs-model"
    config = PretrainConfig(
        data_format="pairs",
        source_file=src,
        target_file=tgt,
        max_steps=60,
        dropout=0.0,
        patience=None,
        **TINY,
    )
    result = pretrain(config, out, progress=False)
    return config, result, out


def state_dict_of(path):
    return load_file(os.path.join(path, "model.safetensors"))


# --------------------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip_and_single_eos():
    tok = build_tokenizer(sentences(WORDS_A, 200, seed=0), vocab_size=300, min_frequency=2)
    assert 260 < len(tok) <= 300  # at most vocab_size: the training words run out of merges
    for text in [
        "the cat sat on a mat .",
        "a dog , then it is n't ok !",
        "  Zebras, 42 owls; Ünïcode ☃ and tabs\tok",
        "a  b",
    ]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    # merges were learned: a frequent word is shorter than its bytes
    assert len(tok(" barn")["input_ids"]) < len(" barn")
    # EOS is one special token, and the only token added to the byte alphabet besides merges
    eos = tok.eos_token_id
    assert tok(EOS_TOKEN)["input_ids"] == [eos]
    assert tok.convert_ids_to_tokens(eos) == EOS_TOKEN
    assert eos in tok.all_special_ids
    assert tok.bos_token_id == tok.pad_token_id == eos
    assert tok.decode(tok(f"hi{EOS_TOKEN}")["input_ids"], skip_special_tokens=True) == "hi"
    # nothing is added on encode
    assert eos not in tok("the cat")["input_ids"]


# --------------------------------------------------------------------------------------------------------
# reading data and building rows


def test_read_text_lines_skips_blank_lines(tmp_path):
    path = write_lines(tmp_path / "t.txt", ["  one  ", "", "   ", "two"])
    assert read_text_lines(path) == ["one", "two"]


def test_read_pairs(tmp_path):
    src = write_lines(tmp_path / "s.txt", ["dog frisbee catch", "ski mountain"])
    tgt = write_lines(tmp_path / "t.txt", ["A dog catches a frisbee.", "Skiers ski. "])
    assert read_pairs(src, tgt) == [
        ("dog frisbee catch", "A dog catches a frisbee."),
        ("ski mountain", "Skiers ski."),
    ]


def test_split_holds_out_whole_prompts(tmp_path):
    pairs = [(f"p{i % 40}", f"target {i}") for i in range(200)]  # 40 prompts with 5 targets each
    train, val = pt_data._split(pairs, [p for p, _ in pairs], 0.1, torch.Generator().manual_seed(0))
    assert len(train) + len(val) == 200 and sorted(train + val) == sorted(pairs)
    assert len(val) == 4 * 5  # 10% of the prompts, with all their targets
    assert not {p for p, _ in train} & {p for p, _ in val}
    # pretrain's loader splits pairs by prompt too
    src = write_lines(tmp_path / "s.txt", [p for p, _ in pairs])
    tgt = write_lines(tmp_path / "t.txt", [t for _, t in pairs])
    config = PretrainConfig(data_format="pairs", source_file=src, target_file=tgt, validation_fraction=0.1)
    train, val = pt_data._load_examples(config, torch.Generator().manual_seed(0))
    assert len(val) == 20 and not {p for p, _ in train} & {p for p, _ in val}
    # without keys, examples are held out one by one
    train, val = pt_data._split(list(range(200)), None, 0.1, torch.Generator().manual_seed(0))
    assert len(val) == 20 and sorted(train + val) == list(range(200))


def test_pair_rows_mask_prompt_and_padding():
    tok = build_tokenizer(["dog frisbee catch = A dog catches a frisbee."] * 5, vocab_size=300)
    rows = pt_data._pair_rows(
        [("dog frisbee catch", "A dog catches a frisbee.")], tok, 64, " =", prompt_loss=False
    )
    prompt = tok("dog frisbee catch =")["input_ids"]
    target = tok(" A dog catches a frisbee.")["input_ids"]
    n = len(prompt) + len(target) + 1
    ids, mask, labels = rows.input_ids[0], rows.attention_mask[0], rows.labels[0]
    assert ids[:n].tolist() == prompt + target + [tok.eos_token_id]
    assert tok.decode(ids[:n]) == f"dog frisbee catch = A dog catches a frisbee.{EOS_TOKEN}"
    assert mask.tolist() == [1] * n + [0] * (64 - n)
    assert labels[: len(prompt)].eq(-100).all()  # no loss on the prompt
    assert labels[len(prompt) : n].tolist() == target + [tok.eos_token_id]  # target and EOS are learned
    assert labels[n:].eq(-100).all()  # nor on padding (which is EOS too)
    # prompt_loss=True learns the prompt as well; truncation cuts long examples to the context
    rows = pt_data._pair_rows(
        [("dog frisbee catch", "A dog catches a frisbee.")], tok, 8, " =", prompt_loss=True
    )
    assert rows.input_ids.shape == (1, 8) and rows.truncated == 1
    assert rows.labels[0].tolist() == rows.input_ids[0].tolist()


def test_packed_text_rows_predict_every_token_once():
    lines = sentences(WORDS_A, 30, seed=1)
    tok = build_tokenizer(lines, vocab_size=300)
    rows = pt_data._text_rows(lines, tok, 16, pack=True)
    stream_len = 1 + sum(len(tok(line)["input_ids"]) + 1 for line in lines)
    # labels[:, 0] is never a target (nothing precedes it); every other stream token is a target exactly once
    assert int((rows.labels[:, 1:] != -100).sum()) == stream_len - 1
    assert rows.input_ids[0, 0] == tok.eos_token_id
    # unpacked: one line per row, EOS before and after
    rows = pt_data._text_rows(lines[:2], tok, 32, pack=False)
    first = [tok.eos_token_id, *tok(lines[0])["input_ids"], tok.eos_token_id]
    assert rows.input_ids[0, : len(first)].tolist() == first


# --------------------------------------------------------------------------------------------------------
# a pairs run: saved directory, loading, generation, loss


def test_saved_directory_loads_and_generates(trained_pairs):
    config, result, out = trained_pairs
    names = set(os.listdir(out))
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "pretrain_config.json",
        "pretrain_metrics.jsonl",
    } <= names
    assert not [n for n in os.listdir(out.parent) if n.startswith(".")]  # no temporary sibling left
    assert result.output_dir == str(out)

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    eos = tok.eos_token_id
    assert tok(EOS_TOKEN)["input_ids"] == [eos]
    assert model.config.eos_token_id == model.config.bos_token_id == model.config.pad_token_id == eos
    assert model.generation_config.eos_token_id == eos
    assert model.config.vocab_size == len(tok) <= config.vocab_size
    assert model.config.n_positions == config.context
    assert result.num_parameters == sum(p.numel() for p in model.parameters())
    sentence = "A dog catches a frisbee in the park."
    assert tok.decode(tok(sentence)["input_ids"]) == sentence

    prompt = tok("dog frisbee catch =", return_tensors="pt")
    out_ids = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert out_ids.shape[1] > prompt["input_ids"].shape[1]
    assert tok.decode(out_ids[0]).startswith("dog frisbee catch =")

    assert PretrainConfig.from_dict(json.loads((out / "pretrain_config.json").read_text())) == config
    lines = [json.loads(line) for line in (out / "pretrain_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == result.eval_steps == [0, 10, 20, 30, 40, 50, 60]
    assert [r["val_loss"] for r in lines] == pytest.approx(result.val_loss)
    assert lines[-1]["best_val_loss"] == pytest.approx(result.best_val_loss)


def test_loss_decreases(trained_pairs):
    _, result, _ = trained_pairs
    assert result.steps == len(result.train_loss) == 60
    assert not result.stopped_early
    assert result.stop_reason == "max_steps=60 reached"
    assert sum(result.train_loss[-10:]) / 10 < sum(result.train_loss[:10]) / 10 - 0.5
    assert result.val_loss[-1] < result.val_loss[0] - 0.5
    assert result.best_val_loss == min(result.val_loss)
    # the held-out prompts are whole concept sets: the split sizes add up
    assert result.num_train_examples + result.num_val_examples == 300
    assert result.num_val_examples > 0


# --------------------------------------------------------------------------------------------------------
# early stopping


@pytest.fixture
def overfit_text(tmp_path):
    """Four training sentences repeated, fresh validation sentences from the same words: validation improves
    while the model learns the words, then gets worse as it memorises the four sentences."""
    train = write_lines(tmp_path / "train.txt", sentences(WORDS_A, 4, seed=0) * 50)
    val = write_lines(tmp_path / "val.txt", sentences(WORDS_A, 20, seed=1))
    return train, val


def test_early_stopping_keeps_best_weights(overfit_text, tmp_path):
    train, val = overfit_text
    common = dict(TINY, eval_every=5, learning_rate=1e-2, lr_schedule="constant", warmup_fraction=0.0)
    common.update(text_file=train, validation_text_file=val, dropout=0.0)
    result = pretrain(PretrainConfig(max_steps=200, patience=3, **common), tmp_path / "es", progress=False)
    assert result.stopped_early
    assert result.stop_reason == (
        f"early stopping: no held-out improvement for 3 evaluations (best at step {result.best_step})"
    )
    assert result.steps < 200
    assert 0 < result.best_step < result.steps
    assert result.best_val_loss == min(result.val_loss) < result.val_loss[-1]
    # the last `patience` evaluations did not improve
    assert result.eval_steps[-4] == result.best_step and len(result.eval_steps) == result.steps // 5 + 1

    # the saved weights are the best checkpoint's: a run stopped at best_step gives the same tensors
    again = pretrain(
        PretrainConfig(max_steps=result.best_step, patience=None, **common), tmp_path / "b", progress=False
    )
    assert again.val_loss[-1] == pytest.approx(result.best_val_loss, abs=1e-6)
    saved, reference = state_dict_of(tmp_path / "es"), state_dict_of(tmp_path / "b")
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in saved)
    # ... and score the best validation loss, not the last one
    tok = AutoTokenizer.from_pretrained(tmp_path / "es")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "es")
    rows = pt_data._text_rows(read_text_lines(val), tok, TINY["context"], pack=False)
    saved_loss = pt_loop._evaluate(model, rows, 16, torch.device("cpu"))
    assert saved_loss == pytest.approx(result.best_val_loss, abs=1e-5)
    assert saved_loss < result.val_loss[-1] - 0.1


def test_early_stopping_without_learning(overfit_text, tmp_path):
    train, val = overfit_text
    config = PretrainConfig(
        **dict(TINY, eval_every=1),
        text_file=train,
        validation_text_file=val,
        learning_rate=0.0,
        max_steps=50,
        patience=2,
    )
    result = pretrain(config, tmp_path / "flat", progress=False)
    assert result.stopped_early
    assert result.stop_reason == "early stopping: no held-out improvement for 2 evaluations (best at step 0)"
    assert result.steps == 2 and result.eval_steps == [0, 1, 2]
    assert result.best_step == 0
    assert result.val_loss == [result.val_loss[0]] * 3


# --------------------------------------------------------------------------------------------------------
# why training stopped


def test_max_epochs_stops_before_max_steps_and_says_so(tmp_path, capsys, caplog):
    # 40 lines, 5% held out -> 38 training rows -> 3 batches of 16 per epoch: 2 epochs are 6 steps
    train = write_lines(tmp_path / "train.txt", sentences(WORDS_A, 40, seed=3))
    config = PretrainConfig(text_file=train, **{**TINY, "max_epochs": 2, "eval_every": 100}, max_steps=600)
    with caplog.at_level("INFO", logger="dinado.pretrain"):
        result = pretrain(config, tmp_path / "m", progress=True)
    assert result.steps == 6 and not result.stopped_early
    reason = (
        "max_epochs=2 reached at step 6, before max_steps=600 "
        "(raise --max-epochs or set it to none to train for --max-steps)"
    )
    assert result.stop_reason == reason
    assert result.to_dict()["stop_reason"] == reason
    assert f"pretrain stopped: {reason}" in capsys.readouterr().err  # in the progress output
    assert reason in caplog.text  # and in the log

    # without max_steps there is nothing to raise it for; a fractional limit is printed as given
    config = PretrainConfig(text_file=train, **{**TINY, "max_epochs": 0.5, "eval_every": 100})
    result = pretrain(config, tmp_path / "half", progress=False)
    assert result.steps == 2 and result.stop_reason == "max_epochs=0.5 reached at step 2"
    assert "pretrain stopped" not in capsys.readouterr().err  # progress=False prints nothing


def test_max_steps_wins_a_tie_with_max_epochs(tmp_path):
    train = write_lines(tmp_path / "train.txt", sentences(WORDS_A, 40, seed=3))
    config = PretrainConfig(text_file=train, **{**TINY, "max_epochs": 1, "eval_every": 100}, max_steps=3)
    result = pretrain(config, tmp_path / "m", progress=False)
    assert result.steps == 3 and result.stop_reason == "max_steps=3 reached"


# --------------------------------------------------------------------------------------------------------
# determinism


def test_same_seed_same_weights(tmp_path):
    train = write_lines(tmp_path / "train.txt", sentences(WORDS_A + WORDS_B, 150, seed=2))
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        config = PretrainConfig(text_file=train, max_steps=12, seed=seed, dropout=0.1, **TINY)
        runs[name] = pretrain(config, tmp_path / name, progress=False)
    a, b, c = (state_dict_of(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs["a"].train_loss == runs["b"].train_loss
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed matters


# --------------------------------------------------------------------------------------------------------
# config


def test_config_round_trip_and_unknown_keys(tmp_path):
    config = PretrainConfig(data_format="pairs", source_file=tmp_path / "s", target_file="t", n_layer=2)
    d = config.to_dict()
    assert d["source_file"] == str(tmp_path / "s")  # paths are stored as strings (JSON)
    assert PretrainConfig.from_dict(json.loads(json.dumps(d))) == config
    default = PretrainConfig()  # the data files can be filled in later; pretrain() insists on them
    assert (
        default.learning_rate == 1e-3 and default.vocab_size == 8000 and default.validation_fraction == 0.05
    )
    with pytest.raises(ValueError, match="needs text_file"):
        pretrain(default, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match=r"unknown PretrainConfig keys: 'n_layers', 'vocab'"):
        PretrainConfig.from_dict({**d, "n_layers": 3, "vocab": 10})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_embd": 30, "n_head": 4}, "divisible by n_head"),
        ({"vocab_size": 100}, "vocab_size must be an integer >= 257"),
        ({"max_steps": None, "max_epochs": None}, "give max_steps or max_epochs"),
        ({"data_format": "csv"}, "data_format must be one of"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"patience": 0}, "patience"),
        ({"source_file": "s"}, "does not use source_file"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**{"text_file": "x.txt", **kwargs})


# --------------------------------------------------------------------------------------------------------
# bad input: clear errors and nothing left behind


def assert_empty(directory):
    assert list(Path(directory).iterdir()) == []


def test_missing_file(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError, match=r"text file not found: .*nope\.txt"):
        pretrain(
            PretrainConfig(text_file=str(tmp_path / "nope.txt"), max_steps=2, **TINY),
            out / "m",
            progress=False,
        )
    with pytest.raises(FileNotFoundError, match=r"target file not found: .*t\.txt"):
        read_pairs(write_lines(tmp_path / "s.txt", ["a"]), tmp_path / "t.txt")
    with pytest.raises(FileNotFoundError, match="source file not found"):
        read_pairs(tmp_path / "missing.txt", tmp_path / "s.txt")
    assert_empty(out)


def test_mismatched_pairs(tmp_path):
    src = write_lines(tmp_path / "train_src.txt", ["a b", "c d", "e f"])
    tgt = write_lines(tmp_path / "train_trg.txt", ["A b.", "C d."])
    out = tmp_path / "out"
    out.mkdir()
    message = r"train_src\.txt' has 3 lines, .*train_trg\.txt' has 2"
    with pytest.raises(ValueError, match=message):
        read_pairs(src, tgt)
    config = PretrainConfig(data_format="pairs", source_file=src, target_file=tgt, max_steps=2, **TINY)
    with pytest.raises(ValueError, match=message):
        pretrain(config, out / "nested" / "m", progress=False)
    assert_empty(out)


def test_empty_data(tmp_path):
    empty = write_lines(tmp_path / "empty.txt", ["", "  "])
    with pytest.raises(ValueError, match="has no non-blank lines"):
        read_text_lines(empty)
    (tmp_path / "s.txt").write_text("")
    (tmp_path / "t.txt").write_text("")
    with pytest.raises(ValueError, match="no examples"):
        read_pairs(tmp_path / "s.txt", tmp_path / "t.txt")
    with pytest.raises(ValueError, match=r"line 2 of .*t2\.txt' is blank"):
        read_pairs(
            write_lines(tmp_path / "s2.txt", ["a", "b"]), write_lines(tmp_path / "t2.txt", ["A.", " "])
        )
    one = write_lines(tmp_path / "one.txt", ["just one line"])
    with pytest.raises(ValueError, match="cannot hold out a validation split: only 1 examples"):
        pretrain(PretrainConfig(text_file=one, max_steps=2, **TINY), tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_prompts_longer_than_the_context(tmp_path):
    src = write_lines(tmp_path / "s.txt", [" ".join(WORDS_B * 3)] * 10)
    tgt = write_lines(tmp_path / "t.txt", ["A short target."] * 10)
    config = PretrainConfig(data_format="pairs", source_file=src, target_file=tgt, max_steps=2, **TINY)
    config.validation_source_file, config.validation_target_file = src, tgt
    with pytest.raises(ValueError, match=r"no training rows left .*prompt fills the context \(32 tokens\)"):
        pretrain(config, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()


def test_existing_output_dir(tmp_path):
    train = write_lines(tmp_path / "train.txt", sentences(WORDS_A, 60, seed=0))
    config = PretrainConfig(text_file=train, max_steps=2, **TINY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty.*overwrite=True"):
        pretrain(config, out, progress=False)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["out", "train.txt"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        pretrain(config, tmp_path / "file", progress=False)

    pretrain(config, out, progress=False, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert sorted(os.listdir(tmp_path)) == ["file", "out", "train.txt"]  # no temporary or old copy left

    empty = tmp_path / "empty"
    empty.mkdir()
    pretrain(config, empty, progress=False)  # an existing empty directory is fine
    assert "model.safetensors" in os.listdir(empty)


def test_failure_during_training_leaves_nothing(tmp_path, monkeypatch):
    train = write_lines(tmp_path / "train.txt", sentences(WORDS_A, 60, seed=0))
    out = tmp_path / "runs"
    out.mkdir()
    calls = []

    def failing_evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return 1.0

    monkeypatch.setattr(pt_loop, "_evaluate", failing_evaluate)
    config = PretrainConfig(
        text_file=train, max_steps=30, eval_every=2, **{k: v for k, v in TINY.items() if k != "eval_every"}
    )
    with pytest.raises(RuntimeError, match="boom"):
        pretrain(config, out / "a" / "b" / "model", progress=False)
    assert len(calls) == 2
    assert_empty(out)  # neither the temporary directory nor the parents it created remain


# --------------------------------------------------------------------------------------------------------
# architecture="marian": an encoder-decoder on parallel source/target files

EN_WORDS = "the cat dog sees eats a big small red fish bird house".split()
DE_WORDS = "der katze hund sieht frisst ein grosser kleiner roter fisch vogel haus".split()
EN_DE = dict(zip(EN_WORDS, DE_WORDS, strict=True))

# Two layers of width 64: the word-for-word "translation" below is learned in about 6 s on one thread.
MARIAN = dict(
    architecture="marian",
    data_format="pairs",
    vocab_size=300,
    n_layer=2,
    n_embd=64,
    n_head=4,
    context=32,
    batch_size=16,
    learning_rate=3e-3,
    max_epochs=None,
    eval_every=50,
)


def translation_pairs(n, seed):
    """English-like word sequences and their word-for-word German-like translations."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = rng.choices(EN_WORDS, k=rng.randint(3, 6))
        pairs.append((" ".join(words), " ".join(EN_DE[w] for w in words)))
    return pairs


def write_pairs(directory, name, pairs):
    return (
        write_lines(Path(directory) / f"{name}.src", [s for s, _ in pairs]),
        write_lines(Path(directory) / f"{name}.tgt", [t for _, t in pairs]),
    )


@pytest.fixture(scope="module")
def marian_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("marian")
    src, tgt = write_pairs(d, "train", translation_pairs(400, seed=0))
    val_pairs = translation_pairs(40, seed=1)
    val_src, val_tgt = write_pairs(d, "val", val_pairs)
    config = PretrainConfig(
        source_file=src,
        target_file=tgt,
        validation_source_file=val_src,
        validation_target_file=val_tgt,
        max_steps=300,
        dropout=0.0,
        patience=None,
        **MARIAN,
    )
    out = d / "marian-model"
    result = pretrain(config, out, progress=False)
    return config, result, out, val_pairs


def test_marian_learns_to_translate(marian_run):
    config, result, out, val_pairs = marian_run
    assert result.steps == 300 and result.eval_steps == [0, 50, 100, 150, 200, 250, 300]
    assert result.num_val_examples == 40 and result.num_train_examples == 400
    assert result.truncated_examples == 0
    # per target token: from about log(vocab) to well under a nat
    assert result.val_loss[0] > 5.0
    assert result.best_val_loss == min(result.val_loss) < 0.6
    assert result.val_loss[-1] < result.val_loss[0] - 4.0

    # the model reads the source: the same targets after mismatched sources score far worse
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    rows = pt_data._seq2seq_rows(val_pairs, tok, config.context)
    matched = pt_loop._evaluate(model, rows, 16, torch.device("cpu"))
    assert matched == pytest.approx(result.best_val_loss, abs=1e-5)  # the saved weights are the best ones
    shuffled = [(val_pairs[(i + 1) % 40][0], t) for i, (_, t) in enumerate(val_pairs)]
    mismatched = pt_loop._evaluate(
        model, pt_data._seq2seq_rows(shuffled, tok, config.context), 16, torch.device("cpu")
    )
    assert mismatched > matched + 1.0

    # greedy translations of the held-out sources, decoded with the tokenizer: mostly word-perfect
    batch = tok([s for s, _ in val_pairs], return_tensors="pt", padding=True)
    generated = model.generate(**batch, do_sample=False, max_new_tokens=24)
    assert (generated[:, 0] == tok.eos_token_id).all()  # the decoder start token
    texts = tok.batch_decode(generated, skip_special_tokens=True)
    words = sum(
        a == b
        for text, (_, ref) in zip(texts, val_pairs, strict=True)
        for a, b in zip(text.split(), ref.split(), strict=False)
    )
    assert words / sum(len(ref.split()) for _, ref in val_pairs) > 0.6


def test_marian_saved_directory(marian_run):
    config, result, out, _ = marian_run
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "pretrain_config.json",
        "pretrain_metrics.jsonl",
    } <= set(os.listdir(out))
    assert not [n for n in os.listdir(out.parent) if n.startswith(".")]
    assert PretrainConfig.from_dict(json.loads((out / "pretrain_config.json").read_text())) == config

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert model.config.model_type == "marian" and model.config.is_encoder_decoder
    eos = tok.eos_token_id
    assert eos == 0 and tok(EOS_TOKEN, add_special_tokens=False)["input_ids"] == [eos]
    # the tokenizer appends EOS, as the encoder saw it in training (and as Marian's tokenizers do)
    plain = tok("der katze frisst", add_special_tokens=False)["input_ids"]
    assert tok("der katze frisst")["input_ids"] == [*plain, eos]
    assert tok("a cat", text_target="der katze frisst")["labels"] == [*plain, eos]
    assert tok.decode(tok("der katze frisst")["input_ids"], skip_special_tokens=True) == "der katze frisst"
    assert tok.decode(plain) == "der katze frisst"
    for name in ("eos_token_id", "pad_token_id", "decoder_start_token_id"):
        assert getattr(model.config, name) == getattr(model.generation_config, name) == eos, name
    c = model.config
    assert (c.d_model, c.encoder_layers, c.decoder_layers) == (64, 2, 2)
    assert (c.encoder_attention_heads, c.decoder_attention_heads) == (4, 4)
    assert (c.encoder_ffn_dim, c.decoder_ffn_dim) == (256, 256)
    assert c.max_position_embeddings == config.context and c.vocab_size == len(tok) <= config.vocab_size
    # one embedding matrix for encoder, decoder and output layer
    shared = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is shared
    assert (
        model.get_encoder().embed_tokens.weight is shared
        and model.get_decoder().embed_tokens.weight is shared
    )
    # parameters trained: all but the fixed sinusoidal position tables (which reload as requires_grad=True)
    trained = sum(p.numel() for n, p in model.named_parameters() if "embed_positions" not in n)
    assert result.num_parameters == trained
    # the tokenizer learned merges from the targets as well as the sources
    for word in (" katze", " sees"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) < len(word)


def test_marian_rows_and_truncation(tmp_path):
    texts = [s for p in translation_pairs(100, 0) for s in p]
    tok = build_tokenizer(texts, vocab_size=300, append_eos=True)
    eos = tok.eos_token_id
    pairs = [("the cat sees a fish", "der katze sieht ein fisch"), ("a dog", "ein hund")]
    rows = pt_data._seq2seq_rows(pairs, tok, context=32)
    src, tgt = tok(pairs[0][0])["input_ids"], tok(pairs[0][1])["input_ids"]  # both end in EOS
    assert src[-1] == tgt[-1] == eos and eos not in src[:-1] + tgt[:-1]
    assert rows.input_ids[0, : len(src)].tolist() == src
    assert rows.labels[0, : len(tgt)].tolist() == tgt
    assert rows.decoder_input_ids[0, : len(tgt)].tolist() == [eos, *tgt[:-1]]  # labels shifted right
    assert (rows.labels[0, len(tgt) :] == -100).all()
    # the loss is per target token: the target ids and their EOS
    assert int((rows.labels != -100).sum()) == sum(len(tok(t)["input_ids"]) for _, t in pairs)
    assert rows.truncated == 0
    batch = rows.batch([1])
    assert batch["input_ids"].shape[1] == len(tok("a dog")["input_ids"])
    # the same rows from a tokenizer that appends nothing (the GPT-2 one): EOS is added by the rows
    plain = build_tokenizer(texts, vocab_size=300)
    assert plain("a dog")["input_ids"][-1] != eos
    assert torch.equal(pt_data._seq2seq_rows(pairs, plain, context=32).input_ids, rows.input_ids)
    assert batch["labels"].shape == batch["decoder_input_ids"].shape == batch["decoder_attention_mask"].shape

    # longer than the context: the source keeps its EOS, the target is cut; each example counted once
    long_src, long_tgt = " ".join(EN_WORDS * 3), " ".join(DE_WORDS * 3)
    rows = pt_data._seq2seq_rows(
        [(long_src, long_tgt), (long_src, "ein hund"), ("a dog", "ein hund")], tok, 8
    )
    assert rows.truncated == 2
    assert rows.input_ids[0].tolist() == [*tok(long_src)["input_ids"][:7], eos]
    assert rows.labels[0].tolist() == tok(long_tgt)["input_ids"][:8]
    assert eos not in rows.labels[0].tolist()  # the cut target lost its EOS
    assert rows.input_ids.shape == rows.labels.shape == (3, 8)

    # and training on them works (positions stay within the model's `context`)
    short = list(EN_DE.items())  # one word each: no truncation
    src_file, tgt_file = write_pairs(tmp_path, "long", [(long_src, long_tgt)] * 10 + short)
    config = PretrainConfig(
        source_file=src_file, target_file=tgt_file, **{**MARIAN, "context": 8, "max_steps": 2}
    )
    result = pretrain(config, tmp_path / "m", progress=False)
    # the repeated long pair is one prompt: all 10 copies land on the same side of the split
    assert result.truncated_examples == 10
    assert result.num_train_examples + result.num_val_examples == 10 + len(short)


def test_marian_same_seed_same_weights(tmp_path):
    src, tgt = write_pairs(tmp_path, "train", translation_pairs(100, seed=3))
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        config = PretrainConfig(
            source_file=src, target_file=tgt, seed=seed, dropout=0.1, **{**MARIAN, "max_steps": 6}
        )
        runs[name] = pretrain(config, tmp_path / name, progress=False)
    a, b, c = (state_dict_of(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs["a"].train_loss == runs["b"].train_loss
    assert runs["a"].val_loss == runs["b"].val_loss
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_marian_eos_embedding_is_trained():
    """EOS is also PAD and the decoder start token; Marian would make its embedding a frozen zero row."""
    pairs = translation_pairs(8, seed=4)
    tok = build_tokenizer([s for p in pairs for s in p], vocab_size=300, append_eos=True)
    config = PretrainConfig(source_file="s", target_file="t", max_steps=1, **MARIAN)
    torch.manual_seed(0)
    model = pt_model._build_model(
        config, tok
    ).eval()  # no dropout: the two backward passes below are comparable
    shared = model.get_input_embeddings().weight
    assert shared[tok.eos_token_id].abs().sum() > 0
    loss, count = pt_loop._rows_loss(
        model, pt_data._seq2seq_rows(pairs, tok, 32), range(8), torch.device("cpu")
    )
    assert count == sum(len(tok(t)["input_ids"]) for _, t in pairs)
    loss.backward()
    grad = shared.grad[tok.eos_token_id].clone()
    # Marian's padding_idx would drop the input-side part of that gradient (the tied output layer's remains)
    model.zero_grad()
    modules = [model.model.shared, model.get_encoder().embed_tokens, model.get_decoder().embed_tokens]
    assert [m.padding_idx for m in modules] == [None] * 3
    for module in modules:
        module.padding_idx = tok.eos_token_id
    pt_loop._rows_loss(model, pt_data._seq2seq_rows(pairs, tok, 32), range(8), torch.device("cpu"))[
        0
    ].backward()
    assert (grad - shared.grad[tok.eos_token_id]).abs().sum() > 1e-3 * grad.abs().sum() > 0
    assert model.generation_config.decoder_start_token_id == tok.eos_token_id


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"architecture": "marian", "text_file": "x.txt"},
            r"architecture='marian' \(encoder-decoder\) needs data_format='pairs'.*got data_format='text'",
        ),
        ({"architecture": "t5", "text_file": "x.txt"}, r"architecture must be one of \('gpt2', 'marian'\)"),
        (
            {"architecture": "marian", "data_format": "pairs", "prompt_loss": True},
            "prompt_loss=True is for architecture='gpt2' only",
        ),
    ],
)
def test_marian_config_errors(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        PretrainConfig(**kwargs)
    config = PretrainConfig(text_file="x.txt")
    config.architecture = "marian"  # changed after construction: pretrain() checks again, before any work
    with pytest.raises(ValueError, match="needs data_format='pairs'"):
        pretrain(config, tmp_path / "m", progress=False)
    assert not (tmp_path / "m").exists()
