"""The `dinado` CLI end to end on a tiny saved model, and its bad-input behaviour."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dinado.cli import main
from dinado.config import GuideConfig

from .conftest import tiny_gpt2, tiny_marian_with_tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, gpt2_tokenizer):
    path = tmp_path_factory.mktemp("base")
    tokenizer = gpt2_tokenizer
    model = tiny_gpt2(vocab_size=len(tokenizer), width=32, layers=1)
    model.config.eos_token_id = model.config.bos_token_id = model.config.pad_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sample_train_generate_merge_end_to_end(tmp_path, base_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The\nA\n")
    # a random model rarely says anything in particular: an oracle that about half of the samples pass
    oracle = "{type: regex, pattern: '[aeiou]{2}'}"
    code, out, err = _run(
        capsys,
        "sample",
        "--base",
        base_dir,
        "--prompts",
        prompts,
        "--oracle",
        oracle,
        "--num-samples",
        16,
        "--max-new-tokens",
        6,
        "--output",
        tmp_path / "s",
    )
    assert code == 0, err
    assert (tmp_path / "s" / "samples.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())["num_samples"] == 16
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump({"variant": "dinado-merge", "max_steps": 3, "batch_size": 8, "lora_r": 2})
    )
    code, out, err = _run(
        capsys,
        "train",
        "--config",
        config,
        "--base",
        base_dir,
        "--samples",
        tmp_path / "s",
        "--output",
        tmp_path / "g",
        "--allow-no-positives",
    )
    assert code == 0, err
    lines = (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert (tmp_path / "g" / "guide" / "guide.safetensors").is_file()
    assert any((tmp_path / "g" / "tensorboard").iterdir())
    code, out, err = _run(
        capsys,
        "generate",
        "--base",
        base_dir,
        "--guide",
        tmp_path / "g" / "guide",
        "--prompts",
        prompts,
        "--max-new-tokens",
        5,
        "--output",
        tmp_path / "out",
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["The", "A"]
    code, out, err = _run(
        capsys,
        "generate",
        "--base",
        base_dir,
        "--prompts",
        prompts,
        "--max-new-tokens",
        5,
        "--output",
        tmp_path / "out-base",
    )
    assert code == 0, err
    refs = tmp_path / "refs.txt"
    refs.write_text("The cat sat . ||| The cat sat down .\nA dog ran .\n")
    code, out, err = _run(
        capsys,
        "evaluate",
        "--generations",
        tmp_path / "out",
        "--compare",
        tmp_path / "out-base",
        "--base",
        base_dir,
        "--oracle",
        oracle,
        "--references",
        refs,
        "--train-run",
        tmp_path / "g",
        "--output",
        tmp_path / "eval",
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"base", "guide"}
    for values in metrics.values():
        assert (
            0 <= values["success"] <= 1 and values["base_perplexity"] > 1 and values["tokens_per_second"] > 0
        )
        assert 0 <= values["bleu"] <= 100 and values["count"] == 2
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| prompt | base | guide |" in report
    assert (tmp_path / "eval" / "training_curves.png").stat().st_size > 1000
    code, out, err = _run(
        capsys, "merge", "--base", base_dir, "--guide", tmp_path / "g" / "guide", "--output", tmp_path / "m"
    )
    assert code == 0, err
    assert (tmp_path / "m" / "model.safetensors").is_file()
    from dinado._utils import plain_file_mode

    for name in ("model.safetensors", "config.json", "config.yaml"):  # safetensors itself writes 0600
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == plain_file_mode(), name
    # --adapter-scale 0 folds in none of the adapter: the base's own weights; the default folds in all of it
    from safetensors.torch import load_file

    code, out, err = _run(
        capsys, "merge", "--base", base_dir, "--guide", tmp_path / "g" / "guide", "--output", tmp_path / "m0",
        "--adapter-scale", "0",
    )  # fmt: skip
    assert code == 0, err
    base_weights = load_file(Path(base_dir) / "model.safetensors")
    for scale, folder in ((0, "m0"), (1, "m")):
        merged = load_file(tmp_path / folder / "model.safetensors")
        same = all(torch.allclose(merged[k], base_weights[k]) for k in base_weights if k in merged)
        assert same == (scale == 0), scale
    # the merged run directory is itself a model: the natural next step works
    code, out, err = _run(
        capsys, "generate", "--base", tmp_path / "m", "--prompts", prompts, "--max-new-tokens", 5,
        "--output", tmp_path / "out-merged",
    )  # fmt: skip
    assert code == 0, err


def _assert_error(capsys, tmp_path, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("dinado ") and message in errors[0], err
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, base_dir, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("The\n")
    run = tmp_path / "run"
    common = ["--base", base_dir, "--prompts", prompts, "--output", run]
    _assert_error(capsys, tmp_path, ["sample", *common, "--keywords", " , "], "empty keyword set")
    _assert_error(
        capsys,
        tmp_path,
        [
            "sample",
            "--base",
            base_dir,
            "--prompts",
            tmp_path / "missing.txt",
            "--keywords",
            "dog",
            "--output",
            run,
        ],
        "missing.txt not found",
    )
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("num_sample: 3\n")
    _assert_error(
        capsys,
        tmp_path,
        ["sample", "--config", bad_config, *common, "--keywords", "dog"],
        "unknown key(s) num_sample",
    )
    _assert_error(
        capsys,
        tmp_path,
        ["sample", "--base", tmp_path / "nobase", "--prompts", prompts, "--keywords", "dog", "--output", run],
        "cannot load base model",
    )
    # an oracle that returns a value outside [0, 1]
    _assert_error(
        capsys, tmp_path, ["sample", *common, "--oracle", "{type: callable, path: 'math:sqrt'}"], "oracle"
    )


def test_train_refuses_samples_without_a_positive_and_unknown_variants(tmp_path, base_dir, capsys):
    from dinado import SampleSet

    SampleSet.from_token_ids([[464]], [[50256]], [0.0]).save(tmp_path / "neg.safetensors")
    argv = [
        "train",
        "--base",
        base_dir,
        "--samples",
        tmp_path / "neg.safetensors",
        "--output",
        tmp_path / "run",
    ]
    _assert_error(capsys, tmp_path, argv, "no sample in")
    SampleSet.from_token_ids([[464]], [[50256]], [1.0]).save(tmp_path / "pos.safetensors")
    argv = [
        "train",
        "--base",
        base_dir,
        "--samples",
        tmp_path / "pos.safetensors",
        "--variant",
        "fudge",
        "--output",
        tmp_path / "run",
    ]
    _assert_error(capsys, tmp_path, argv, "unknown variant 'fudge'")


def test_guide_and_base_that_do_not_match_are_refused(tmp_path, base_dir, capsys):
    from dinado import Guide

    Guide.create(tiny_gpt2(vocab_size=40), "nado").save_pretrained(tmp_path / "other-guide")
    prompts = tmp_path / "p.txt"
    prompts.write_text("The\n")
    argv = [
        "generate",
        "--base",
        base_dir,
        "--guide",
        tmp_path / "other-guide",
        "--prompts",
        prompts,
        "--output",
        tmp_path / "run",
    ]
    _assert_error(capsys, tmp_path, argv, "guide and base do not match")


def test_pretrain_sample_train_generate_evaluate_on_a_tiny_config(tmp_path, capsys):
    from dinado.tasks.toy_language import ToyLanguage

    examples = ToyLanguage(0).examples(300)
    (tmp_path / "src.txt").write_text("\n".join(e.prompt for e in examples) + "\n")
    (tmp_path / "tgt.txt").write_text("\n".join(e.sentence for e in examples) + "\n")
    (tmp_path / "prompts.txt").write_text("dog run =\ncat ball see =\n")
    base = tmp_path / "base"
    data = [
        "--data-format",
        "pairs",
        "--source-file",
        tmp_path / "src.txt",
        "--target-file",
        tmp_path / "tgt.txt",
    ]
    code, out, err = _run(
        capsys,
        "pretrain",
        *data,
        "--vocab-size",
        300,
        "--n-layer",
        1,
        "--n-embd",
        32,
        "--n-head",
        2,
        "--context",
        32,
        "--max-steps",
        30,
        "--eval-every",
        10,
        "--output",
        base,
    )
    assert code == 0, err
    assert (base / "model.safetensors").is_file() and (base / "tokenizer.json").is_file()
    code, out, err = _run(
        capsys,
        "sample",
        "--base",
        base,
        "--prompts",
        tmp_path / "prompts.txt",
        "--oracle",
        "{type: regex, pattern: 'e'}",
        "--num-samples",
        8,
        "--max-new-tokens",
        8,
        "--output",
        tmp_path / "s",
    )
    assert code == 0, err
    code, out, err = _run(
        capsys,
        "train",
        "--base",
        base,
        "--samples",
        tmp_path / "s",
        "--variant",
        "dinado-soft",
        "--head",
        "tied",
        "--head-rank",
        4,
        "--max-steps",
        4,
        "--batch-size",
        8,
        "--output",
        tmp_path / "g",
        "--allow-no-positives",
    )
    assert code == 0, err
    saved = json.loads((tmp_path / "g" / "guide" / "dinado_config.json").read_text())
    assert (saved["head"], saved["head_rank"]) == ("tied", 4)
    code, out, err = _run(
        capsys,
        "generate",
        "--base",
        base,
        "--guide",
        tmp_path / "g" / "guide",
        "--prompts",
        tmp_path / "prompts.txt",
        "--do-sample",
        "true",
        "--output",
        tmp_path / "out",
    )
    assert code == 2 and "exceeds the model's 32 positions: lower max_new_tokens" in err  # 32 new + prompt
    gen = [
        "generate",
        "--base",
        base,
        "--guide",
        tmp_path / "g" / "guide",
        "--prompts",
        tmp_path / "prompts.txt",
    ]
    code, out, err = _run(
        capsys, *gen, "--do-sample", "true", "--max-new-tokens", 16, "--output", tmp_path / "out"
    )
    assert code == 0, err
    code, out, err = _run(
        capsys, *gen, "--max-new-tokens", 4, "--candidates", 5, "--output", tmp_path / "out-top5"
    )
    assert code == 0, err
    assert len((tmp_path / "out-top5" / "generations.jsonl").read_text().splitlines()) == 2
    code, out, err = _run(capsys, *gen[:3], *gen[5:], "--candidates", 5, "--output", tmp_path / "no")
    assert code == 2 and "--candidates restricts a guide module's head" in err
    code, out, err = _run(
        capsys,
        "evaluate",
        "--generations",
        tmp_path / "out",
        "--keywords",
        "dog",
        "--base",
        base,
        "--output",
        tmp_path / "eval",
    )
    assert code == 0, err
    assert "coverage" in json.loads((tmp_path / "eval" / "metrics.json").read_text())["guide"]
    code, out, err = _run(
        capsys,
        "pretrain",
        *data,
        "--output",
        base,
    )
    assert code == 2 and "is not empty" in err


def test_train_tracks_validation_success_and_asks_for_wandb_when_missing(tmp_path, base_dir, capsys):
    from dinado import SampleSet

    SampleSet.from_token_ids(
        [[464]] * 4, [[50256], [262, 50256], [11, 50256], [50256]], [1.0, 0.0, 1.0, 0.0]
    ).save(tmp_path / "s.safetensors")
    prompts = tmp_path / "val.txt"
    prompts.write_text("The\nA\n")
    argv = [
        "train",
        "--base",
        base_dir,
        "--samples",
        tmp_path / "s.safetensors",
        "--variant",
        "nado",
        "--max-steps",
        4,
        "--batch-size",
        2,
        "--val-prompts",
        prompts,
        "--val-every",
        2,
        "--val-max-new-tokens",
        4,
        "--oracle",
        "{type: regex, pattern: 'e'}",
    ]
    code, out, err = _run(capsys, *argv, "--output", tmp_path / "g")
    assert code == 0, err
    gen = ["generate", "--base", base_dir, "--guide", tmp_path / "g" / "guide", "--prompts", prompts]
    code, out, err = _run(capsys, *gen, "--candidates", 3, "--output", tmp_path / "top3")
    # NADO with candidates: the tail keeps p's mass (NADOParameterization.candidate_log_q)
    assert code == 0, err
    assert len((tmp_path / "top3" / "generations.jsonl").read_text().splitlines()) == 2
    records = [json.loads(line) for line in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_success" in r] == [1, 2, 4]
    assert all(0.0 <= r["val_success"] <= 1.0 for r in records if "val_success" in r)
    code, out, err = _run(capsys, "evaluate", "--generations", tmp_path / "none", "--output", tmp_path / "e")
    assert code == 2 and "generations file" in err
    try:
        import wandb  # noqa: F401
    except ImportError:
        _assert_error(
            capsys,
            tmp_path,
            [*argv, "--report-to", "wandb", "--output", tmp_path / "run"],
            "--report-to wandb needs the wandb package",
        )


def test_evaluate_report_puts_each_systems_output_in_its_column(tmp_path, capsys):
    for run, words in (("a", ["one dog", "two"]), ("b", ["three", "four dogs"])):
        (tmp_path / run).mkdir()
        rows = [{"prompt": p, "completion": w} for p, w in zip(["P1", "P2"], words, strict=True)]
        (tmp_path / run / "generations.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, out, err = _run(
        capsys,
        "evaluate",
        "--generations",
        tmp_path / "b",
        "--compare",
        tmp_path / "a",
        "--keywords",
        "dog",
        "--output",
        tmp_path / "eval",
    )
    assert code == 0, err
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| P1 | one dog | three |" in report and "| P2 | two | four dogs |" in report
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["base"]["success"] == 0.5 and metrics["guide"]["success"] == 0.5


def test_train_resume_continues_to_the_same_weights_as_a_straight_run(tmp_path, base_dir, capsys):
    from safetensors.torch import load_file

    from dinado import SampleSet

    SampleSet.from_token_ids(
        [[464]] * 4, [[50256], [262, 50256], [11, 50256], [50256]], [1.0, 0.0, 1.0, 0.0]
    ).save(tmp_path / "s.safetensors")
    argv = [
        "train",
        "--base",
        base_dir,
        "--samples",
        tmp_path / "s.safetensors",
        "--variant",
        "dinado-soft",
        "--batch-size",
        2,
        "--checkpoint-every",
        2,
    ]
    assert _run(capsys, *argv, "--max-steps", 8, "--output", tmp_path / "straight")[0] == 0
    assert _run(capsys, *argv, "--max-steps", 4, "--output", tmp_path / "resumed")[0] == 0
    code, out, err = _run(capsys, *argv, "--max-steps", 8, "--output", tmp_path / "resumed", "--resume")
    assert code == 0, err
    a = load_file(str(tmp_path / "straight" / "guide" / "guide.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "guide" / "guide.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    # without --resume an existing run directory is refused
    code, out, err = _run(capsys, *argv, "--max-steps", 8, "--output", tmp_path / "resumed")
    assert code == 2 and "is not empty" in err


def test_an_encoder_decoder_base_runs_sample_train_generate_evaluate_merge(tmp_path, capsys):
    """A saved Marian base: the CLI loads it as a seq2seq model and its prompts are the sources."""
    texts = ["the cat sat", "Sie sind nett", "du bist nett", "you are kind"]
    model, tokenizer = tiny_marian_with_tokenizer(texts * 3, vocab_size=280, max_positions=32)
    base = tmp_path / "marian"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    prompts = tmp_path / "sources.txt"
    prompts.write_text("the cat sat\nyou are kind\n")
    oracle = "{type: regex, pattern: '[aeiou]'}"
    common = ["--base", base, "--prompts", prompts, "--max-new-tokens", 5]
    code, _, err = _run(
        capsys, "sample", *common, "--oracle", oracle, "--num-samples", 8, "--output", tmp_path / "s"
    )
    assert code == 0, err
    from dinado import SampleSet

    samples = SampleSet.load(tmp_path / "s" / "samples.safetensors")
    assert samples.decoder_start_token_id == 0 and samples.prompts[0][-1] == 0  # sources end with EOS
    (tmp_path / "t.yaml").write_text(
        yaml.safe_dump({"variant": "dinado-merge", "max_steps": 2, "batch_size": 8})
    )
    code, _, err = _run(
        capsys, "train", "--config", tmp_path / "t.yaml", "--base", base, "--samples", tmp_path / "s",
        "--output", tmp_path / "g", "--allow-no-positives",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = _run(
        capsys, "generate", *common, "--guide", tmp_path / "g" / "guide", "--output", tmp_path / "o"
    )
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "o" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat sat", "you are kind"]
    code, _, err = _run(
        capsys, "evaluate", "--generations", tmp_path / "o", "--base", base, "--oracle", oracle,
        "--output", tmp_path / "e",
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert next(iter(metrics.values()))["base_perplexity"] > 1
    code, _, err = _run(
        capsys, "merge", "--base", base, "--guide", tmp_path / "g" / "guide", "--output", tmp_path / "m"
    )
    assert code == 0, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["is_encoder_decoder"] is True


# Every Guide.create option (a GuideConfig field other than what a guide records about its base) is a `train` flag
# and a config key: a new GuideConfig field without one fails here.
def _guide_options():
    bookkeeping = ("extra",)
    return [
        f
        for f in dataclasses.fields(GuideConfig)
        if not (f.name.startswith("base_") or f.name.endswith("_fingerprint") or f.name in bookkeeping)
    ]


def _example(f):
    """(flag text, value) for a GuideConfig field, other than its default."""
    parts = [part.strip() for part in str(f.type).split("|")]
    if "list[str]" in parts:
        return "a,b", ["a", "b"]
    examples = {"int": ("3", 3), "float": ("0.25", 0.25), "str": (f"x-{f.name}", f"x-{f.name}")}
    if parts[0] == "bool":
        return ("true", True) if f.default is False else ("false", False)
    assert parts[0] in examples, f"no example value for GuideConfig.{f.name}: {f.type}"
    return examples[parts[0]]


def test_every_guide_config_option_is_settable_from_train(tmp_path, base_dir, capsys, monkeypatch):
    from dinado import Guide, SampleSet

    SampleSet.from_token_ids([[464]] * 2, [[50256], [262, 50256]], [1.0, 0.0]).save(
        tmp_path / "s.safetensors"
    )
    created = []

    def create(cls, base, variant, tokenizer=None, seed=None, **options):
        created.append({"variant": variant, **options})
        raise ValueError("recorded")

    monkeypatch.setattr(Guide, "create", classmethod(create))
    fields = _guide_options()
    assert {"num_layers", "module_dim", "lora_dropout", "consistency", "head_rank", "pointer"} <= {
        f.name for f in fields
    }
    flags = [arg for f in fields for arg in ("--" + f.name.replace("_", "-"), _example(f)[0])]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({f.name: _example(f)[1] for f in fields}))
    common = [
        "train",
        "--base",
        base_dir,
        "--samples",
        tmp_path / "s.safetensors",
        "--output",
        tmp_path / "g",
    ]
    for argv in ([*common, *flags], [*common, "--config", tmp_path / "c.yaml"]):
        code, _, err = _run(capsys, *argv)
        assert code == 2 and "error: recorded" in err, err  # stopped in Guide.create, not at a flag or key
        assert created.pop() == {f.name: _example(f)[1] for f in fields}


def test_new_guide_options_reach_the_saved_guide_config(tmp_path, base_dir, capsys):
    from dinado import SampleSet

    SampleSet.from_token_ids([[464]] * 2, [[50256], [262, 50256]], [1.0, 0.0]).save(
        tmp_path / "s.safetensors"
    )
    common = ["train", "--base", base_dir, "--samples", tmp_path / "s.safetensors", "--max-steps", 1]
    module = ["--variant", "nado", "--num-layers", 1, "--module-dim", 16, "--num-heads", 2, "--head-rank", 4,
              "--max-positions", 64]  # fmt: skip
    merge = ["--variant", "dinado-merge", "--lora-dropout", 0.1, "--lora-target-modules", "c_attn",
             "--consistency", "hard"]  # fmt: skip
    for name, options in (("module", module), ("merge", merge)):
        code, _, err = _run(capsys, *common, *options, "--output", tmp_path / name)
        assert code == 0, err
    saved = json.loads((tmp_path / "module" / "guide" / "dinado_config.json").read_text())
    assert (saved["num_layers"], saved["module_dim"], saved["num_heads"]) == (1, 16, 2)
    assert (saved["head_rank"], saved["max_positions"]) == (4, 64)
    saved = json.loads((tmp_path / "merge" / "guide" / "dinado_config.json").read_text())
    assert (saved["lora_dropout"], saved["lora_target_modules"], saved["consistency"]) == (
        0.1,
        ["c_attn"],
        "hard",
    )
    assert yaml.safe_load((tmp_path / "merge" / "config.yaml").read_text())["lora_target_modules"] == [
        "c_attn"
    ]
    # one regular expression (PEFT matches it against full module names): only the attention's output projection
    regex = r".*h\.0\.attn\.c_pro[j]"
    code, _, err = _run(
        capsys, *common, *merge[:4], "--lora-target-modules", regex, "--output", tmp_path / "re"
    )
    assert code == 0, err
    saved = json.loads((tmp_path / "re" / "guide" / "dinado_config.json").read_text())
    assert saved["lora_target_modules"] == regex
    names = [n for n in load_file(tmp_path / "re" / "guide" / "guide.safetensors") if "lora" in n]
    assert names and all(".attn.c_proj." in n for n in names)
    code, _, err = _run(
        capsys, *common, *merge[:4], "--lora-target-modules", "c_(attn", "--output", tmp_path / "x"
    )
    assert code == 2 and "not a valid regular expression" in err


def test_generate_passes_no_repeat_ngram_size_to_generate_only_when_given(
    tmp_path, base_dir, capsys, monkeypatch
):
    from dinado.cli import commands

    calls = []
    real = commands.generate_texts

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(commands, "generate_texts", spy)
    (tmp_path / "prompts.txt").write_text("the dog\na cat\n")
    gen = ["generate", "--base", base_dir, "--prompts", tmp_path / "prompts.txt", "--max-new-tokens", 12]
    code, _, err = _run(capsys, *gen, "--num-beams", 2, "--output", tmp_path / "plain")
    assert code == 0, err
    code, _, err = _run(
        capsys, *gen, "--num-beams", 2, "--no-repeat-ngram-size", 1, "--output", tmp_path / "nr"
    )
    assert code == 0, err
    assert "no_repeat_ngram_size" not in calls[0] and calls[1]["no_repeat_ngram_size"] == 1
    code, _, err = _run(capsys, *gen, "--no-repeat-ngram-size", 0, "--output", tmp_path / "zero")
    assert code == 2 and "--no-repeat-ngram-size" in err and not (tmp_path / "zero").exists()


def test_generate_reranks_beams_by_the_guide_s_value_at_an_adapter_scale(tmp_path, base_dir, capsys):
    """--adapter-scale decodes what `dinado merge --adapter-scale` writes; --rerank-by-value returns, of its final
    beams, the one the library's rerank picks by the guide's own value."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dinado import Guide
    from dinado.text import generate_texts

    from .conftest import randomize_guide

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    guide = Guide.create(base, "dinado-merge", tokenizer=tokenizer, lora_target_modules=["c_attn"])
    randomize_guide(guide, scale=0.2)
    guide.save_pretrained(tmp_path / "g")
    prompts = ["The", "A", "The dog", "One day", "It was", "She"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    gen = ["generate", "--prompts", tmp_path / "prompts.txt", "--max-new-tokens", 8, "--num-beams", 3]
    assert _run(capsys, "merge", "--base", base_dir, "--guide", tmp_path / "g", "--adapter-scale", 2,
                "--output", tmp_path / "merged")[0] == 0  # fmt: skip
    runs = {
        "merged": ["--base", tmp_path / "merged"],
        "scaled": ["--base", base_dir, "--guide", tmp_path / "g", "--adapter-scale", 2],
        "reranked": ["--base", base_dir, "--guide", tmp_path / "g", "--adapter-scale", 2, "--rerank-by-value", "true"],
    }  # fmt: skip
    texts = {}
    for name, argv in runs.items():
        code, _, err = _run(capsys, *gen, *argv, "--output", tmp_path / f"gen-{name}")
        assert code == 0, err
        lines = (tmp_path / f"gen-{name}" / "generations.jsonl").read_text().splitlines()
        texts[name] = [json.loads(line)["completion"] for line in lines]
    assert texts["scaled"] == texts["merged"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer.pad_token = tokenizer.eos_token  # as the CLI's loader sets it
    expected, _, _ = generate_texts(
        merged,
        tokenizer,
        prompts,
        rerank=Guide.from_pretrained(tmp_path / "g", base),
        num_beams=3,
        max_new_tokens=8,
        pad_token_id=tokenizer.eos_token_id,
    )
    assert texts["reranked"] == expected and texts["reranked"] != texts["scaled"]
