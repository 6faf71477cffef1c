import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import dinado
from dinado import Guide, SampleSet, exact
from dinado.cli import main

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


# ------------------------------------------------------------------------------------------------------------
# The CLI catalogue (docs/errors.md): one case per kind of bad input. Each must end with exit code 2 and one
# line on stderr that names the problem and the fix, and leave nothing half-written.

TEXTS = [f"the {a} {v} the {b} ." for a in ("dog", "cat", "bird", "fox") for v in ("sees", "likes", "chases")
         for b in ("ball", "tree", "river", "boat")]  # fmt: skip


def out_of_range(prompts, completions):  # an oracle (by import path) that breaks the [0, 1] contract
    return [2.0] * len(completions)


def _save_base(path: Path, model, tokenizer) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny saved bases (one reference, one with other weights, one with another tokenizer of the same size),
    a sample run, a trained nado run and a few input files."""
    from dinado.pretrain import build_tokenizer

    root = tmp_path_factory.mktemp("world")
    tok_a = build_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    tok_b = build_tokenizer([t.upper() for t in TEXTS], vocab_size=300, min_frequency=1)
    vocab = max(len(tok_a), len(tok_b))
    w = {"root": root}
    w["base"] = _save_base(root / "base", tiny_gpt2(0, vocab_size=vocab, layers=1), tok_a)
    w["other_weights"] = _save_base(root / "other-weights", tiny_gpt2(1, vocab_size=vocab, layers=1), tok_a)
    w["other_tokenizer"] = _save_base(root / "other-tok", tiny_gpt2(0, vocab_size=vocab, layers=1), tok_b)
    w["prompts"] = root / "prompts.txt"
    w["prompts"].write_text("the dog\n\nthe cat\n")
    common = ["--prompts", w["prompts"], "--max-new-tokens", 6]
    oracle = ["--oracle", "{type: regex, pattern: 'e'}"]
    for name, base in (("samples", w["base"]), ("samples_other", w["other_weights"])):
        code = main(
            [
                str(a)
                for a in [
                    "sample",
                    "--base",
                    base,
                    *common,
                    *oracle,
                    "--num-samples",
                    8,
                    "--seed",
                    1,
                    "--output",
                    root / name,
                ]
            ]
        )  # fmt: skip  (seed 1: positives)
        assert code == 0
        w[name] = root / name
    code = main([str(a) for a in ["train", "--base", w["base"], "--samples", w["samples"], "--variant", "nado",
                                  "--max-steps", 2, "--batch-size", 4, "--checkpoint-every", 1,
                                  "--allow-no-positives", "--output", root / "train"]])  # fmt: skip
    assert code == 0
    w["train"] = root / "train"
    w["guide"] = root / "train" / "guide"
    SampleSet.from_token_ids([[5]], [[7, 0]], [0.0]).save(root / "negatives.safetensors")
    w["negatives"] = root / "negatives.safetensors"
    (root / "empty.txt").write_text("\n  \n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    long_prompt = " ".join(["the dog sees the ball ."] * 12)
    (root / "long.txt").write_text(f"the dog\n{long_prompt}\n")
    for name, text in {
        "typo": "num_sample: 3\n",
        "malformed": "num_samples: [3\n",
        "steps_words": "max_steps: three hundred\n",
        "steps_list": "batch_size: [32]\n",
        "steps_fraction": "max_steps: 5.7\n",
        "null_count": "max_new_tokens:\n",
        "zero_temperature": "temperature: 0\n",
        "not_mapping": "- a\n- b\n",
    }.items():
        (root / f"{name}.yaml").write_text(text)
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("precious\n")
    return w


@dataclasses.dataclass
class Case:
    id: str
    argv: Callable[[dict], list]  # the command line, given the world
    problem: str  # a substring naming the problem
    fix: str  # a substring naming the fix
    code: int = 2


def _sample(w, *extra):
    return ["sample", "--base", w["base"], "--prompts", w["prompts"], "--keywords", "dog", *extra]


def _train(w, *extra, samples="samples"):
    return [
        "train",
        "--base",
        w["base"],
        "--samples",
        w[samples],
        "--max-steps",
        2,
        "--batch-size",
        4,
        *extra,
    ]


def _generate(w, *extra, base="base"):
    return ["generate", "--base", w[base], "--prompts", w["prompts"], "--max-new-tokens", 4, *extra]


CASES = [
    Case("flag typo", lambda w: _sample(w, "--num-sample", 3), "unrecognized arguments: --num-sample",
         "did you mean --num-samples?"),
    Case("missing prompts file", lambda w: _sample(w, "--prompts", w["root"] / "nope.txt"),
         "nope.txt not found", "one prompt per line"),
    Case("empty prompts file", lambda w: _sample(w, "--prompts", w["root"] / "empty.txt"),
         "holds no prompts", "write one prompt per line"),
    Case("prompts file not text", lambda w: _sample(w, "--prompts", w["root"] / "binary.txt"),
         "is not UTF-8 text", "one prompt per line"),
    Case("over-long prompt (names its line)", lambda w: _sample(w, "--prompts", w["root"] / "long.txt"),
         "long.txt line 2: prompt of", "shorten the prompts"),
    Case("--max-new-tokens past the model's positions", lambda w: _sample(w, "--max-new-tokens", 80),
         "exceeds the model's 64 positions", "lower max_new_tokens"),
    Case("negative count", lambda w: _sample(w, "--num-samples", -3), "--num-samples: must be at least 1",
         "--help"),
    Case("fractional count as a flag", lambda w: _train(w, "--max-steps", 5.7),
         "--max-steps: expected a whole number, got '5.7'", "--help"),
    Case("non-finite number", lambda w: _sample(w, "--temperature", "nan"), "expected a finite number",
         "--help"),
    Case("bad boolean", lambda w: _generate(w, "--do-sample", "maybe"), "expected true or false, got 'maybe'",
         "--help"),
    Case("unknown YAML key", lambda w: _sample(w, "--config", w["root"] / "typo.yaml"),
         "unknown key(s) num_sample", "did you mean num_samples?"),
    Case("malformed YAML", lambda w: _sample(w, "--config", w["root"] / "malformed.yaml"),
         "cannot read config file", "fix the YAML"),
    Case("YAML that is not a mapping", lambda w: _sample(w, "--config", w["root"] / "not_mapping.yaml"),
         "must hold a mapping", "key: value per line"),
    Case("missing config file", lambda w: _sample(w, "--config", w["root"] / "nope.yaml"),
         "nope.yaml not found", "check the --config path"),
    Case("YAML number in words", lambda w: _train(w, "--config", w["root"] / "steps_words.yaml"),
         "`max_steps:` in", "expected a whole number, got 'three hundred' (as for --max-steps)"),
    Case("YAML list for a number", lambda w: _train(w, "--config", w["root"] / "steps_list.yaml"),
         "`batch_size:` in", "is [32]: expected a whole number >= 1, as for --batch-size"),
    Case("YAML fraction for a whole number", lambda w: _train(w, "--config", w["root"] / "steps_fraction.yaml"),
         "is 5.7", "expected a whole number >= 1, as for --max-steps"),
    Case("YAML empty value", lambda w: _sample(w, "--config", w["root"] / "null_count.yaml"),
         "`max_new_tokens:` in", "or remove the key"),
    Case("YAML value out of range", lambda w: _sample(w, "--config", w["root"] / "zero_temperature.yaml"),
         "must be greater than 0, got 0", "(as for --temperature)"),
    Case("required flag missing", lambda w: ["sample", "--base", w["base"], "--prompts", w["prompts"]],
         "--output is required", "`output:` in the config file"),
    Case("no oracle", lambda w: ["sample", "--base", w["base"], "--prompts", w["prompts"]],
         "an oracle is required", "--keywords a,b"),
    Case("--keywords with --oracle", lambda w: _sample(w, "--oracle", "{type: regex, pattern: x}"),
         "give either --oracle or --keywords", "not both"),
    Case("empty keyword set", lambda w: ["sample", "--base", w["base"], "--prompts", w["prompts"],
                                         "--keywords", " , "], "empty keyword set", "--keywords dog,frisbee"),
    Case("unknown oracle type", lambda w: ["sample", "--base", w["base"], "--prompts", w["prompts"],
                                           "--oracle", "{type: sentiment}"], "unknown oracle type 'sentiment'",
         "valid types: keywords"),
    Case("oracle that is not a mapping", lambda w: ["sample", "--base", w["base"], "--prompts", w["prompts"],
                                                    "--oracle", "[a, b]"], "--oracle must be a mapping",
         "{type: regex"),
    Case("oracle values outside [0, 1]", lambda w: ["sample", "--base", w["base"], "--prompts", w["prompts"],
                                                    "--oracle", "{type: callable, path: 'tests.test_bad_input:out_of_range'}"],
         "returned 2.0 for sample 0", "values must be finite and in [0, 1]"),
    Case("missing local --base path", lambda w: _sample(w, "--base", w["root"] / "nope"),
         "no such directory", "check the path"),
    Case("path-like --base under an existing folder", lambda w: _sample(w, "--base", "tests/nope"),
         "no such directory: tests/nope", "check the path"),
    Case("--base is a file", lambda w: _sample(w, "--base", w["prompts"]), "is a file",
         "give the directory of a saved model"),
    Case("--base is a train run", lambda w: _sample(w, "--base", w["train"]),
         "is a `dinado train` run", "as --guide"),
    Case("a run directory as --guide", lambda w: _generate(w, "--guide", w["train"]),
         "is a `dinado train` run directory", "pass its guide, --guide"),
    Case("guide on a base with other weights", lambda w: _generate(w, "--guide", w["guide"],
                                                                   base="other_weights"),
         "differs (weights hash", "--allow-base-mismatch"),
    Case("guide with another tokenizer", lambda w: _generate(w, "--guide", w["guide"], base="other_tokenizer"),
         "tokenizer hash", "--allow-base-mismatch"),
    Case("samples from another base", lambda w: _train(w, samples="samples_other"),
         "the sample set was made with base", "--allow-base-mismatch"),
    Case("samples with no positive", lambda w: _train(w, samples="negatives"),
         "satisfies the oracle", "--allow-no-positives"),
    Case("missing samples file", lambda w: ["train", "--base", w["base"], "--samples", w["root"] / "nope"],
         "samples file", "a `dinado sample` run directory"),
    Case("unknown variant", lambda w: _train(w, "--variant", "fudge"), "unknown variant 'fudge'",
         "choose one of"),
    Case("--resume with another variant", lambda w: _train(w, "--variant", "dinado-soft", "--resume",
                                                                  "--output", w["train"]),
         "holds a nado guide but --variant is dinado-soft", "resume with --variant nado"),
    Case("existing output directory", lambda w: _sample(w, "--output", w["root"] / "existing"),
         "is not empty", "pass --overwrite"),
    Case("existing train output", lambda w: _train(w, "--output", w["root"] / "existing"), "is not empty",
         "continue that run with --resume"),
    Case("--num-return-sequences without sampling", lambda w: _generate(w, "--num-return-sequences", 3),
         "--num-return-sequences 3 needs --do-sample true", "same output every time"),
    Case("merge of a module guide", lambda w: ["merge", "--base", w["base"], "--guide", w["guide"]],
         "merge() needs variant 'dinado-merge'", "`dinado generate --guide`"),
    Case("--rerank-by-value without a guide", lambda w: _generate(w, "--num-beams", 3, "--rerank-by-value", "true"),
         "ranks the final beams by a guide's value", "give the guide with --guide"),
    Case("--rerank-by-value without beams", lambda w: _generate(w, "--guide", w["guide"], "--rerank-by-value", "true"),
         "picks one of beam search's final beams", "--num-beams 4"),
    Case("--adapter-scale with a module guide", lambda w: _generate(w, "--guide", w["guide"], "--adapter-scale", 6),
         "--adapter-scale 6 folds a DiNADO-Merge adapter", "a dinado-merge guide"),
    Case("prompt template without a known slot", lambda w: _sample(w, "--prompt-template", "Use {concepts}"),
         "must use the slot {prompt} or {keywords}", "found concepts"),
    Case("chat template the tokenizer lacks", lambda w: _sample(w, "--chat", "true"), "no chat template",
         "--chat false"),
    Case("missing .gguf file", lambda w: _sample(w, "--base", w["root"] / "model.gguf"), "no such GGUF file",
         "model.gguf"),
    Case("evaluate: generations not found", lambda w: ["evaluate", "--generations", w["root"] / "nope"],
         "generations file", "give a `dinado generate` run directory"),
]  # fmt: skip


def _snapshot(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(path.rglob("*"))
    }


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_catalogue_of_bad_input(case, world, tmp_path, capsys):
    argv = [str(a) for a in case.argv(world)]
    if "--output" not in argv and case.problem != "--output is required":
        argv += ["--output", str(tmp_path / "run")]
    output = Path(argv[argv.index("--output") + 1]) if "--output" in argv else tmp_path / "run"
    watched = {p: _snapshot(p) for p in (world["root"], output)}
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == case.code, err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0].startswith("dinado"), err
    assert case.problem in errors[0] and case.fix in errors[0], errors[0]
    assert "Traceback" not in err
    for path, before in watched.items():  # nothing written, nothing changed, no hidden leftovers
        assert _snapshot(path) == before, path
    assert not list(output.parent.glob(f".{output.name}.partial-*"))


def test_catalogue_has_every_kind_and_docs_list_them():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    missing = [c.id for c in CASES if f"| {c.id} |" not in doc]
    assert not missing, f"docs/errors.md lacks rows for {missing}"


# ------------------------------------------------------------------------------------------------------------
# Config values go through the flags' parsers: the same typed values either way.
def test_yaml_numbers_are_parsed_like_flags(world, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-3\nmax_steps: '2'\nbatch_size: 4\nweight_clip: 5\n")
    argv = ["train", "--base", world["base"], "--samples", world["samples"], "--variant", "nado",
            "--config", config, "--allow-no-positives"]  # fmt: skip
    assert main([str(a) for a in [*argv, "--output", tmp_path / "a"]]) == 0, capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["learning_rate"] == pytest.approx(1e-3) and isinstance(saved["learning_rate"], float)
    assert saved["max_steps"] == 2 and isinstance(saved["max_steps"], int) and saved["weight_clip"] == 5.0
    report = json.loads((tmp_path / "a" / "train_report.json").read_text())
    assert report["steps"] == 2 and report["learning_rate"] == pytest.approx(1e-3)


def test_nullable_keys_take_none_from_flags_and_yaml(world, tmp_path):
    from dinado.cli import build_parser, resolve

    args = build_parser().parse_args(["pretrain", "--max-epochs", "none", "--output", "x"])
    assert resolve("pretrain", args)["max_epochs"] is None
    config = tmp_path / "p.yaml"
    config.write_text("max_epochs: null\nmax_steps: '30'\n")
    resolved = resolve("pretrain", build_parser().parse_args(["pretrain", "--config", str(config)]))
    assert resolved["max_epochs"] is None and resolved["max_steps"] == 30


def test_version_flag(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"dinado {dinado.__version__}"


def test_allow_base_mismatch_overrides_the_check(world, tmp_path, capsys):
    argv = _generate(world, "--guide", world["guide"], base="other_weights")
    code = main([str(a) for a in [*argv, "--allow-base-mismatch", "--output", tmp_path / "g"]])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "g" / "generations.jsonl").is_file()
