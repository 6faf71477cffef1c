"""Smoke test of benchmarks/commongen/run.py on a small slice of CommonGen (the whole pipeline, tiny sizes)."""

import json

import pytest
import torch

from dinado import SampleSet

from .conftest import SHARED_DATA, load_benchmark

DATA = SHARED_DATA / "commongen" / "v1.1_LHRYANG"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not present")
    out = tmp_path_factory.mktemp("commongen") / "run"
    argv = [
        "--quick", "--output", str(out), "--data-dir", str(DATA),
        "--train-sets", "10", "--samples-per-set", "2", "--budgets", "1,2",
        "--guide-steps", "2", "--sft-steps", "2", "--dev-sets", "5", "--test-sets", "4",
        "--efficiency-sets", "6", "--efficiency-steps", "2", "--efficiency-dev-sets", "3",
        "--pretrain-examples", "400", "--pretrain-layers", "1", "--pretrain-embd", "32", "--pretrain-steps", "5",
        "--max-new-tokens", "6", "--beams", "2", "--best-of", "2,3", "--batch-size", "8",
    ]  # fmt: skip
    results = load_benchmark("commongen", "run.py").main(argv)
    return out, results


@pytest.fixture
def generate_calls(monkeypatch):
    """Spy on a benchmark module's generate_texts: install(module) returns the list its calls are recorded in,
    each as (type name of the model or guide decoded with, keyword arguments)."""

    def install(module):
        calls = []
        real = module.generate_texts

        def spy(source, *args, **kwargs):
            calls.append((type(source).__name__, kwargs))
            return real(source, *args, **kwargs)

        monkeypatch.setattr(module, "generate_texts", spy)
        return calls

    return install


def test_the_benchmark_writes_every_system_split_and_decoding(smoke):
    out, results = smoke
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == results["rows"]
    systems = {"base", "nado", "dinado-hard", "dinado-soft", "dinado-merge", "sft-lora", "prompt-tuning"}
    for split, size in (("dev", 5), ("test", 4)):
        assert results["split_sizes"][split] == size
        rows = [r for r in results["rows"] if r["split"] == split]
        for decoding in ("beam 2", "sample"):
            assert {r["system"] for r in rows if r["decoding"] == decoding} == systems
        best = {r["decoding"]: r for r in rows if r["decoding"].startswith("best of")}
        assert set(best) == {"best of 2 samples", "best of 3 samples"}
        assert best["best of 3 samples"]["test_oracle_calls"] == 3 * size
    for r in results["rows"]:
        assert 0.0 <= r["success"] <= r["coverage"] + 1e-9 <= 1.0 + 1e-9
        assert r["spice"] is None and r["bleu4"] is not None
        assert 1.0 < r["base_ppl"] < float("inf")  # the base reading the outputs
        expected = 10 * 2 if r["system"] in systems - {"base", "sft-lora", "prompt-tuning"} else 0
        assert r["train_oracle_calls"] == expected
    table = (out / "results.md").read_text()
    assert "| dev | beam 2 | dinado-merge |" in table and "n/a" in table  # SPICE reported unavailable
    assert {"pretrain base", "sample from the base", "train dinado-merge", "train prompt-tuning"} <= set(
        results["seconds"]
    )


def test_the_efficiency_study_covers_both_variants_arms_and_budgets(smoke):
    out, results = smoke
    cells = results["efficiency"]["cells"]
    keys = {(c["variant"], c["samples"], c["per_set"]) for c in cells}
    assert keys == {(v, a, b) for v in ("nado", "dinado-soft") for a in ("p", "proposal+IS") for b in (1, 2)}
    for c in cells:
        assert c["oracle_calls"] == 6 * c["per_set"]
        assert 0.0 <= c["dev_success"] <= 1.0
        # from p every sample counts fully; proposal samples are importance weighted (ESS <= samples per set)
        if c["samples"] == "p":
            assert c["ess_per_set"] == pytest.approx(c["per_set"])
        else:
            assert 1.0 - 1e-6 <= c["ess_per_set"] <= c["per_set"] + 1e-6
    assert (out / "efficiency.png").stat().st_size > 1000


def test_the_same_pipeline_takes_any_causal_lm_by_path_and_fine_tunes_it_first(tmp_path, gpt2_tokenizer):
    """--base with a GPT-2-tokenizer model (as gpt2-large would be), no pad token, --base-finetune-steps."""
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not present")
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(gpt2_tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2)
    base_dir = tmp_path / "raw-lm"
    GPT2LMHeadModel(config).save_pretrained(base_dir)
    gpt2_tokenizer.save_pretrained(base_dir)
    assert gpt2_tokenizer.pad_token_id is None
    argv = [
        "--quick", "--output", str(tmp_path / "run"), "--data-dir", str(DATA), "--base", str(base_dir),
        "--base-finetune-steps", "2", "--base-finetune-batch-size", "3", "--train-sets", "6", "--samples-per-set", "2", "--guide-steps", "1",
        "--sft-steps", "1", "--dev-sets", "3", "--no-test", "--no-efficiency", "--max-new-tokens", "4",
        "--beams", "2", "--best-of", "2", "--batch-size", "4", "--labels", "soft", "--references", "1",
        "--merge-options", '{"lora_target_modules": ".*c_attn"}',
    ]  # fmt: skip
    results = load_benchmark("commongen", "run.py").main(argv)
    assert (
        results["args"]["labels"] == "soft"
    )  # the guides trained on covered shares; the saved set keeps 0/1
    saved = SampleSet.load(tmp_path / "run" / "samples.safetensors")
    assert set(saved.labels.tolist()) <= {0.0, 1.0}
    assert results["samples_positive_rate"] == pytest.approx(saved.positive_rate)
    # one reference of each of the 6 training sets joined the guides' samples (not the saved set from p)
    assert results["train"]["references"]["samples"] == 6 and len(saved) == 12
    # SFT-LoRA adapts what Merge adapts: r 8 on the one layer's c_attn (32 -> 96): 8 * (32 + 96) parameters
    assert results["train"]["sft-lora"]["trainable_parameters"] == 8 * (32 + 96)
    assert 0 < results["train"]["references"]["mean_label"] <= 1
    # the fine-tuned base is kept, and the run names it: the instruments reopen the base its guides were trained on
    assert results["base"] == str(tmp_path / "run" / "base") and "pretrain base" not in results["seconds"]
    assert results["args"]["base"] == str(base_dir)
    assert "fine-tune base on references" in results["seconds"]
    assert results["base_finetune"]["steps"] == 2 and results["base_finetune"]["batch_size"] == 3
    from dinado import Guide

    _, model, tokenizer, _ = load_benchmark("commongen", "run.py").open_run(tmp_path / "run")
    Guide.from_pretrained(
        tmp_path / "run" / "guides" / "dinado-soft", model, tokenizer=tokenizer
    )  # same base
    assert results["split_sizes"] == {"dev": 3} and results["efficiency"] is None
    assert len([r for r in results["rows"] if r["decoding"] == "beam 2"]) == 7


def test_efficiency_only_runs_the_study_alone(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not present")
    argv = [
        "--quick", "--output", str(tmp_path / "run"), "--data-dir", str(DATA), "--efficiency-only",
        "--train-sets", "6", "--sft-steps", "1", "--budgets", "1", "--efficiency-sets", "4",
        "--efficiency-steps", "1", "--efficiency-dev-sets", "2", "--dev-sets", "2", "--no-test",
        "--pretrain-examples", "300", "--pretrain-layers", "1", "--pretrain-embd", "32", "--pretrain-steps", "3",
        "--max-new-tokens", "4", "--batch-size", "4",
    ]  # fmt: skip
    results = load_benchmark("commongen", "run.py").main(argv)
    assert results["rows"] == [] and results["samples"] == 0
    assert "train sft-lora" in results["seconds"] and "train nado" not in results["seconds"]
    assert len(results["efficiency"]["cells"]) == 4
    assert "Sample efficiency" in (tmp_path / "run" / "results.md").read_text()
    # one arm: from p only, no proposal to fine-tune
    argv[argv.index(str(tmp_path / "run"))] = str(tmp_path / "p-only")
    results = load_benchmark("commongen", "run.py").main([*argv, "--efficiency-arms", "p"])
    assert "train sft-lora" not in results["seconds"]
    assert [(c["variant"], c["samples"]) for c in results["efficiency"]["cells"]] == [
        ("nado", "p"),
        ("dinado-soft", "p"),
    ]


def test_guide_adam_epsilon_and_the_labels_reach_every_guides_training(tmp_path, monkeypatch, capsys):
    """--guide-adam-epsilon goes to dinado.train, and --labels / --finished-only / --unfinished-weight to the
    labelling oracle, for the systems' guides and the efficiency study's alike."""
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not present")
    run = load_benchmark("commongen", "run.py")
    with pytest.raises(SystemExit):
        run.parse_args(["--output", str(tmp_path / "bad"), "--guide-adam-epsilon", "0"])
    assert "--guide-adam-epsilon" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--output", str(tmp_path / "bad"), "--labels", "soft", "--unfinished-weight", "0.5"])
    assert "--unfinished-weight 0.5 needs --finished-only" in capsys.readouterr().err
    epsilons = []
    real = run.train

    def spy(*args, **kwargs):
        epsilons.append(kwargs.get("adam_epsilon"))
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "train", spy)
    oracles = []
    real_oracle = run.prompt_ids_and_oracle

    def oracle_spy(args, tokenizer, prompts, oracle):
        oracles.append(repr(oracle))
        return real_oracle(args, tokenizer, prompts, oracle)

    monkeypatch.setattr(run, "prompt_ids_and_oracle", oracle_spy)
    argv = [
        "--quick", "--output", str(tmp_path / "run"), "--data-dir", str(DATA), "--train-sets", "4",
        "--samples-per-set", "2", "--guide-steps", "1", "--systems", "nado", "--decodings", "",
        "--best-of", "", "--budgets", "1", "--efficiency-sets", "4", "--efficiency-steps", "1",
        "--efficiency-dev-sets", "2", "--efficiency-arms", "p", "--efficiency-variants", "nado",
        "--dev-sets", "2", "--no-test", "--guide-adam-epsilon", "1e-3", "--labels", "soft", "--finished-only",
        "--unfinished-weight", "0.5",
        "--pretrain-examples", "300", "--pretrain-layers", "1", "--pretrain-embd", "32", "--pretrain-steps", "3",
        "--max-new-tokens", "4", "--batch-size", "4",
    ]  # fmt: skip
    run.main(argv)
    assert epsilons == [1e-3, 1e-3]  # the system's guide, then the efficiency cell (budget 1, from p)
    labelling = [o for o in oracles if "finished_check" in o]
    assert len(labelling) == 2 and all("soft=True" in o for o in labelling)  # systems, then efficiency study
    assert all(
        "Floor(" in o and ", 0.5)" in o for o in labelling
    )  # --unfinished-weight: a penalty, not a zero
    labels = json.loads((tmp_path / "run" / "results.json").read_text())["train"]["labels"]
    assert labels["finished_only"] is True and labels["unfinished_weight"] == pytest.approx(0.5)


def test_the_efficiency_study_with_a_tempered_proposal_needs_no_fine_tuning(tmp_path):
    """--efficiency-temperature: the proposal is p tempered (importance-weighted), --efficiency-alphas sets each
    variant's strength, and the run goes on to the systems when the study is not run alone."""
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not present")
    argv = [
        "--quick", "--output", str(tmp_path / "run"), "--data-dir", str(DATA), "--train-sets", "4",
        "--samples-per-set", "2", "--guide-steps", "1", "--systems", "nado", "--decodings", "greedy",
        "--best-of", "", "--budgets", "1,3", "--efficiency-sets", "5", "--efficiency-steps", "2",
        "--efficiency-dev-sets", "3", "--dev-sets", "3", "--no-test", "--efficiency-temperature", "0.5",
        "--efficiency-alphas", "dinado-soft=3", "--alpha", "2", "--labels", "soft", "--merge-scale", "1.5",
        "--efficiency-variants", "nado,dinado-soft,dinado-merge",
        "--pretrain-examples", "300", "--pretrain-layers", "1", "--pretrain-embd", "32", "--pretrain-steps", "3",
        "--max-new-tokens", "5", "--batch-size", "4",
    ]  # fmt: skip
    results = load_benchmark("commongen", "run.py").main(argv)
    assert "train sft-lora" not in results["seconds"] and "train nado" in results["seconds"]
    assert {r["system"] for r in results["rows"]} == {"base", "nado"}
    eff = results["efficiency"]
    assert eff["proposal"] == "p at temperature 0.5" and eff["labels"] == "soft"
    cells = {(c["variant"], c["samples"], c["per_set"]): c for c in eff["cells"]}
    assert len(cells) == 12
    assert {c["strength"] for k, c in cells.items() if k[0] == "nado"} == {2.0}  # --alpha where none is named
    assert {c["strength"] for k, c in cells.items() if k[0] == "dinado-soft"} == {3.0}
    assert {c["strength"] for k, c in cells.items() if k[0] == "dinado-merge"} == {1.5}  # --merge-scale
    for (_, arm, budget), c in cells.items():
        assert c["oracle_calls"] == 5 * budget and 0.0 <= c["dev_success"] <= c["dev_coverage"] + 1e-9
        if arm == "p" or budget == 1:  # one sample per set normalises to weight 1 whatever it was
            assert c["ess_per_set"] == pytest.approx(budget)
    # three tempered samples per set carry unequal weights p / p_T: fewer than three effective samples
    assert 1.0 <= cells[("nado", "proposal+IS", 3)]["ess_per_set"] < 3.0 - 1e-3
    assert "p at temperature 0.5" in (tmp_path / "run" / "results.md").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        *[
            (["--efficiency-alphas", v], f"--efficiency-alphas: {v!r} is not VARIANT=ALPHA")
            for v in ("nado", "dinado-merge=2", "nado=0", "nado=x")
        ],
        (["--efficiency-temperature", "0"], "--efficiency-temperature must be positive, got 0"),
        (["--efficiency-variants", "nado,merge"], "--efficiency-variants takes some of nado, dinado-hard"),
        (["--efficiency-arms", "q"], "--efficiency-arms takes p and/or proposal, got ['q']"),
    ],
)
def test_efficiency_flags_are_checked(tmp_path, flags, message, capsys):
    run = load_benchmark("commongen", "run.py")
    with pytest.raises(SystemExit):
        run.parse_args(["--output", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("variant, kind", [("dinado-merge", "adapter_scale"), ("dinado-soft", "alpha")])
def test_the_strength_is_chosen_on_train_sets_the_run_did_not_train_on(smoke, tmp_path, variant, kind):
    out, results = smoke
    strength = load_benchmark("commongen", "strength.py")
    argv = ["--run", str(out), "--variant", variant, "--sets", "4", "--scales", "0,1,2", "--batch-size", "4"]
    report = strength.main([*argv, "--output", str(tmp_path)])
    assert report["kind"] == kind and [r["strength"] for r in report["rows"]] == [0.0, 1.0, 2.0]
    assert report["chosen"] in (1.0, 2.0) and report["selection_sets"] == 4
    assert report["chosen_is_largest"] is (report["chosen"] == 2.0)
    assert json.loads((tmp_path / "strength.json").read_text()) == report
    assert all(1.0 < r["base_ppl"] < float("inf") for r in report["rows"])
    assert "base ppl" in (tmp_path / "strength.md").read_text()
    # the split is what the run's training subset leaves: with all but 4 train sets trained on, exactly those 4
    from dinado.tasks.commongen import load_split

    train = load_split(DATA, "train")
    run_args = {**results["args"], "train_sets": len(train) - 4}
    trained = load_benchmark("commongen", "run.py").subset(train, len(train) - 4, run_args["seed"] + 1)
    left = {tuple(s.concepts) for s in train} - {tuple(s.concepts) for s in trained}
    picked = strength.selection_split(train, run_args, 10, 31)
    assert {tuple(s.concepts) for s in picked} == left and len(picked) == len(left)


def test_a_selection_split_can_follow_devs_concept_counts():
    from collections import Counter

    from dinado.tasks.commongen import load_split

    strength = load_benchmark("commongen", "strength.py")
    train, dev = load_split(DATA, "train"), load_split(DATA, "dev")
    run_args = {"seed": 0, "train_sets": 100}
    trained = {tuple(s.concepts) for s in load_benchmark("commongen", "run.py").subset(train, 100, 1)}
    uniform = strength.selection_split(train, run_args, 200, 31)
    matched = strength.selection_split(train, run_args, 200, 31, like=dev)
    shares = lambda sets: {k: n / len(sets) for k, n in Counter(len(s.concepts) for s in sets).items()}
    assert shares(uniform)[3] > 0.65  # train is mostly 3-concept sets
    assert len(matched) == 200 and not trained & {tuple(s.concepts) for s in matched}
    for k, share in shares(dev).items():
        assert abs(shares(matched)[k] - share) <= 1 / 200  # dev's shares, to one set
    assert matched == strength.selection_split(train, run_args, 200, 31, like=dev)  # seeded


@pytest.mark.parametrize("scale", ["0", "10000"])
def test_saved_guides_decode_again_without_training_and_merge_at_a_chosen_scale(smoke, tmp_path, scale):
    out, results = smoke
    argv = [
        "--quick", "--output", str(tmp_path / "again"), "--data-dir", str(DATA), "--base", str(out / "base"),
        "--train-sets", "10", "--samples-per-set", "2", "--samples", str(out / "samples.safetensors"),
        "--systems", "dinado-merge", "--reuse-guides", str(out), "--merge-scale", scale, "--dev-sets", "5",
        "--no-test", "--no-efficiency", "--decodings", "greedy", "--best-of", "", "--max-new-tokens", "6",
        "--batch-size", "8",
    ]  # fmt: skip
    again = load_benchmark("commongen", "run.py").main(argv)
    assert again["train"]["dinado-merge"] == {"reused": str(out / "guides" / "dinado-merge")}
    assert not any(k.startswith("train ") for k in again["seconds"])
    assert {r["system"] for r in again["rows"]} == {"base", "dinado-merge"}
    outputs = json.loads((tmp_path / "again" / "outputs.json").read_text())
    # scale 0 folds in none of the adapter: the merged model is the base and decodes what it decodes; the two
    # steps' small weight change, scaled 10,000 times, decodes something else
    same = outputs["dev/greedy/dinado-merge"] == outputs["dev/greedy/base"]
    assert same == (scale == "0")


def test_module_guides_decode_with_candidate_restricted_guidance(smoke, tmp_path, generate_calls):
    out, _ = smoke
    run = load_benchmark("commongen", "run.py")
    calls = generate_calls(run)
    argv = [
        "--quick", "--output", str(tmp_path / "top3"), "--data-dir", str(DATA), "--base", str(out / "base"),
        "--train-sets", "10", "--samples-per-set", "2", "--samples", str(out / "samples.safetensors"),
        "--systems", "dinado-soft,dinado-merge", "--reuse-guides", str(out), "--candidates", "3",
        "--dev-sets", "3", "--no-test", "--no-efficiency", "--decodings", "greedy", "--best-of", "",
        "--max-new-tokens", "4", "--batch-size", "8",
    ]  # fmt: skip
    results = run.main(argv)
    seen = [(name, kwargs.get("candidates")) for name, kwargs in calls]
    # the module guide gets the option; the base and the merged Merge model (plain models) do not
    assert len(seen) == 3 and [c for name, c in seen if name == "Guide"] == [3]
    assert all(c is None for name, c in seen if name != "Guide") and results["args"]["candidates"] == 3


def test_no_repeat_ngram_reaches_beam_search_and_greedy_but_not_sampling(smoke, tmp_path, generate_calls):
    out, _ = smoke
    run = load_benchmark("commongen", "run.py")
    calls = generate_calls(run)
    argv = [
        "--quick", "--output", str(tmp_path / "nr"), "--data-dir", str(DATA), "--base", str(out / "base"),
        "--train-sets", "10", "--samples-per-set", "2", "--samples", str(out / "samples.safetensors"),
        "--systems", "dinado-soft", "--reuse-guides", str(out), "--no-repeat-ngram", "2", "--beams", "2",
        "--dev-sets", "3", "--no-test", "--no-efficiency", "--decodings", "greedy,beam,sample", "--best-of", "",
        "--max-new-tokens", "4", "--batch-size", "8",
    ]  # fmt: skip
    results = run.main(argv)
    by_mode = {(k["do_sample"], k["num_beams"] if not k["do_sample"] else 0): k for _, k in calls}
    assert len(calls) == 6 and set(by_mode) == {(False, 1), (False, 2), (True, 0)}
    assert (
        by_mode[(False, 1)]["no_repeat_ngram_size"] == 2 and by_mode[(False, 2)]["no_repeat_ngram_size"] == 2
    )
    assert "no_repeat_ngram_size" not in by_mode[(True, 0)] and results["args"]["no_repeat_ngram"] == 2
    # the rows name the decoding with its restriction, so that combine.py never files them as plain beam / greedy
    assert {r["decoding"] for r in results["rows"]} == {
        "greedy +no-repeat-2",
        "beam 2 +no-repeat-2",
        "sample",
    }
    assert {r["decoding"] for r in run.machine_rows(results["rows"], results["args"])} == {
        "greedy+no-repeat-2",
        "beam2+no-repeat-2",
        "sample",
    }
    # a run recorded before the option existed decodes as it did: no n-gram restriction
    old, tokenizer = run.argparse.Namespace(max_new_tokens=4, beams=2), run.argparse.Namespace(pad_token_id=0)
    assert all("no_repeat_ngram_size" not in run.decode_kwargs(old, tokenizer, m) for m in ("beam", "greedy"))


@pytest.mark.parametrize("script, flags", [("run.py", ["--output", "o"]), ("strength.py", ["--run", "r"])])
def test_no_repeat_ngram_must_not_be_negative(tmp_path, capsys, script, flags):
    module = load_benchmark("commongen", script)
    with pytest.raises(SystemExit):
        (module.parse_args if script == "run.py" else module.main)([*flags, "--no-repeat-ngram", "-1"])
    assert "--no-repeat-ngram" in capsys.readouterr().err


def test_guides_can_train_on_importance_weighted_samples_from_a_merge_proposal(smoke, tmp_path):
    out, smoke_results = smoke
    run = load_benchmark("commongen", "run.py")
    common = [
        "--quick", "--data-dir", str(DATA), "--base", str(out / "base"), "--train-sets", "10",
        "--samples-per-set", "2", "--proposal", str(out), "--dev-sets", "2", "--no-test", "--no-efficiency",
        "--decodings", "greedy", "--best-of", "", "--max-new-tokens", "4", "--batch-size", "8", "--no-base",
    ]  # fmt: skip
    argv = [*common, "--output", str(tmp_path / "prop"), "--systems", "dinado-soft", "--guide-steps", "1"]
    results = run.main([*argv, "--proposal-scale", "3"])
    drawn = SampleSet.load(tmp_path / "prop" / "samples.safetensors")
    assert drawn.log_weights is not None and drawn.log_weights.abs().max() > 1e-3  # q differs from p
    assert "sample from the proposal" in results["seconds"]
    info = results["train"]["proposal"]
    assert info["scale"] == 3 and 1.0 - 1e-6 <= info["ess_per_set"] <= 2.0 + 1e-6
    # the guide's oracle calls: its own 20 samples and the 20 the proposal was trained on
    assert [r["train_oracle_calls"] for r in results["rows"]] == [20 + smoke_results["samples"]]
    # the same samples again, reused: they must carry weights when --proposal is named
    reused = run.main(
        [*common, "--output", str(tmp_path / "again"), "--systems", "", "--samples", str(tmp_path / "prop" /
         "samples.safetensors")]
    )  # fmt: skip
    assert reused["train"]["proposal"]["ess_per_set"] == pytest.approx(info["ess_per_set"])
    with pytest.raises(SystemExit, match="drawn from p"):
        run.main([*common, "--output", str(tmp_path / "p"), "--samples", str(out / "samples.safetensors")])


@pytest.mark.parametrize(
    "flag, check, failing",
    [("--sentences-only", "is_word_list", True), ("--finished-only", "is_finished", False)],
)
@pytest.mark.parametrize("listed", [True, False])
def test_sentences_only_and_finished_only_train_the_guides_on_labels_that_give_failures_zero(
    smoke, tmp_path, monkeypatch, listed, flag, check, failing
):
    out, _ = smoke
    run = load_benchmark("commongen", "run.py")
    import dinado.tasks.commongen as commongen

    # every completion fails the check (a word list / unfinished) when listed, or none does
    monkeypatch.setattr(commongen, check, lambda text: failing if listed else not failing)
    common = [
        "--quick",
        "--data-dir",
        str(DATA),
        "--base",
        str(out / "base"),
        "--train-sets",
        "10",
        "--samples-per-set",
        "2",
        "--samples",
        str(out / "samples.safetensors"),
        "--systems",
        "",
        "--dev-sets",
        "2",
        "--no-test",
        "--no-efficiency",
        "--decodings",
        "greedy",
        "--best-of",
        "",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "8",
        "--no-base",
        "--labels",
        "soft",
        "--references",
        "1",
    ]  # fmt: skip  (the references cover their concepts: labels above 0 unless they fail the check)
    key = flag[2:].replace("-", "_")
    strict = run.main([*common, flag, "--output", str(tmp_path / "strict")])["train"]["labels"]
    plain = run.main([*common, "--output", str(tmp_path / "plain")])["train"]["labels"]
    assert strict[key] and not plain[key] and plain["mean"] > 0
    other = {"sentences_only": "finished_only", "finished_only": "sentences_only"}[key]
    assert not strict[other]
    assert strict["mean"] == (0.0 if listed else pytest.approx(plain["mean"]))
    with pytest.raises(SystemExit, match=flag):
        load_benchmark("commongen", "calibration.py").training_target({"labels": "soft", key: True})


def test_a_proposal_needs_a_saved_merge_guide(tmp_path, capsys):
    run = load_benchmark("commongen", "run.py")
    with pytest.raises(SystemExit):
        run.parse_args(["--output", str(tmp_path / "o"), "--proposal", str(tmp_path)])
    assert "no DiNADO-Merge guide" in capsys.readouterr().err


def test_candidates_must_be_positive(tmp_path, capsys):
    run = load_benchmark("commongen", "run.py")
    with pytest.raises(SystemExit):
        run.parse_args(["--output", str(tmp_path), "--candidates", "0"])
    assert "--candidates" in capsys.readouterr().err
    assert (
        run.parse_args(
            ["--output", str(tmp_path), "--candidates", "5", "--systems", "dinado-hard"]
        ).candidates
        == 5
    )


def test_calibration_reads_the_runs_guides_and_writes_its_report(smoke, tmp_path):
    out, _ = smoke
    argv = ["--run", str(out), "--sets", "2", "--samples-per-set", "2", "--depths", "1,2", "--rollouts", "2"]
    load_benchmark("commongen", "calibration.py").main([*argv, "--output", str(tmp_path)])
    report = json.loads((tmp_path / "calibration.json").read_text())
    assert report["run"] == str(out) and report["table"]


@pytest.mark.parametrize(
    "run_args, values, name",
    [
        ({"labels": "all"}, [0.0, 0.0, 1.0], "all concepts covered"),
        ({"labels": "soft", "label_power": 1.0}, [0.0, 0.5, 1.0], "covered share"),
        ({"labels": "soft", "label_power": 2.0}, [0.0, 0.25, 1.0], "covered share^2"),
    ],
)
def test_calibration_scores_a_guide_against_the_labels_it_was_trained_on(run_args, values, name):
    target, target_name = load_benchmark("commongen", "calibration.py").training_target(run_args)
    assert target_name == name and [target(x) for x in (0.0, 0.5, 1.0)] == pytest.approx(values)


@pytest.mark.parametrize("flags", [["--label-power", "2"], ["--labels", "soft", "--label-power", "0"]])
def test_label_power_needs_soft_labels_and_a_positive_value(tmp_path, flags, capsys):
    run = load_benchmark("commongen", "run.py")
    with pytest.raises(SystemExit):
        run.parse_args(["--output", str(tmp_path), *flags])
    assert "--label-power" in capsys.readouterr().err
    assert (
        run.parse_args(["--output", str(tmp_path), "--labels", "soft", "--label-power", "2"]).label_power == 2
    )


def test_strength_can_be_chosen_under_beam_search(smoke, tmp_path, generate_calls):
    out, results = smoke
    strength = load_benchmark("commongen", "strength.py")
    calls = generate_calls(strength)
    argv = ["--run", str(out), "--sets", "3", "--scales", "0,2", "--batch-size", "4", "--decoding", "beam"]
    report = strength.main([*argv, "--output", str(tmp_path)])
    assert report["decoding"] == "beam" and len(calls) == 2
    assert all(k["num_beams"] == results["args"]["beams"] and k["do_sample"] is False for _, k in calls)
    assert "decoding: beam" in (tmp_path / "strength.md").read_text()
    # --no-repeat-ngram overrides the run's setting for beam search (and is recorded)
    again = strength.main([*argv, "--no-repeat-ngram", "3", "--output", str(tmp_path / "nr")])
    assert [k["no_repeat_ngram_size"] for _, k in calls[2:]] == [3, 3] and again["no_repeat_ngram"] == 3
    assert report["no_repeat_ngram"] == 0 and all("no_repeat_ngram_size" not in k for _, k in calls[:2])
    assert "no repeated 3-grams" in (tmp_path / "nr" / "strength.md").read_text()


def test_strength_can_restrict_guidance_to_candidates_and_choose_by_sentence_success(
    smoke, tmp_path, monkeypatch, generate_calls
):
    out, _ = smoke
    strength = load_benchmark("commongen", "strength.py")
    calls = generate_calls(strength)
    # strength 1 decodes word lists only, strength 2 none: success would pick either, sentence success picks 2
    real_score = strength.score

    def fake_score(args, model, tokenizer, sets, texts):
        metrics = real_score(args, model, tokenizer, sets, texts)
        lists = 1.0 if len(calls) == 2 else 0.0
        return dict(
            metrics,
            success=0.5,
            coverage=0.5,
            word_lists=lists,
            loops=0.0,
            sentence_success=0.5 * (1 - lists),
        )

    monkeypatch.setattr(strength, "score", fake_score)
    argv = [
        "--run",
        str(out),
        "--variant",
        "dinado-soft",
        "--sets",
        "3",
        "--scales",
        "0,1,2",
        "--batch-size",
        "4",
    ]
    report = strength.main(
        [*argv, "--candidates", "5", "--criterion", "sentence_success", "--output", str(tmp_path)]
    )
    seen = [(name, kwargs.get("candidates")) for name, kwargs in calls]
    assert seen == [("GPT2LMHeadModel", None), ("Guide", 5), ("Guide", 5)]  # the base is never restricted
    assert report["candidates"] == 5 and report["criterion"] == "sentence_success" and report["chosen"] == 2.0
    assert report["chosen_is_largest"] is True  # 2 is the grid's top: a larger strength may be better
    assert "(the largest tried)" in (tmp_path / "strength.md").read_text()
    assert [r["word_lists"] for r in report["rows"]] == [0.0, 1.0, 0.0]
    assert "sentence success" in (tmp_path / "strength.md").read_text()
    # the selection split's references score every row too, and the unfinished share is kept
    assert all({"bleu4", "cider", "unfinished"} <= set(r) for r in report["rows"])
    assert all(0 <= r["unfinished"] <= 1 and r["bleu4"] >= 0 for r in report["rows"])
    header = next(
        x for x in (tmp_path / "strength.md").read_text().splitlines() if x.startswith("| strength")
    )
    assert {"unfinished", "BLEU-4", "CIDEr"} <= {c.strip() for c in header.split("|")}
    with pytest.raises(SystemExit, match="module variants"):
        strength.main(
            [
                "--run",
                str(out),
                "--sets",
                "3",
                "--scales",
                "1",
                "--candidates",
                "5",
                "--output",
                str(tmp_path),
            ]
        )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--splits", "dev,train"], "--splits"),
        (["--splits", "dev,dev"], "--splits"),
        (["--splits", "test", "--no-efficiency", "--no-test"], "--splits"),
        (["--splits", "test"], "sample-efficiency study is scored on dev"),
    ],
)
def test_splits_are_checked(tmp_path, flags, message, capsys):
    run = load_benchmark("commongen", "run.py")
    with pytest.raises(SystemExit):
        run.parse_args(["--output", str(tmp_path), *flags])
    assert message in capsys.readouterr().err
    assert run.parse_args(["--output", str(tmp_path), "--no-test"]).splits == ["dev"]


def test_processes_split_a_run_by_split_and_system_and_combine_joins_their_rows(smoke, tmp_path):
    out, _ = smoke
    run = load_benchmark("commongen", "run.py")
    combine = load_benchmark("commongen", "combine.py")
    common = [
        "--quick", "--data-dir", str(DATA), "--base", str(out / "base"), "--train-sets", "10",
        "--samples-per-set", "2", "--samples", str(out / "samples.safetensors"), "--reuse-guides", str(out),
        "--test-sets", "4", "--splits", "test", "--no-efficiency", "--decodings", "greedy", "--best-of", "",
        "--max-new-tokens", "6", "--batch-size", "8",
    ]  # fmt: skip
    guided = run.main([*common, "--output", str(tmp_path / "a"), "--systems", "dinado-merge", "--no-base"])
    guided_cells = {(r["split"], r["decoding"], r["system"]) for r in guided["rows"]}
    assert guided_cells == {("test", "greedy", "dinado-merge")}
    run.main([*common, "--output", str(tmp_path / "b"), "--systems", "", "--merge-scale", "3"])
    rows = combine.combine([tmp_path / "a", tmp_path / "b"])
    assert [(r["system"], r["strength"], r["sets"]) for r in rows] == [
        ("base", None, 4),
        ("dinado-merge", 1.0, 4),
    ]
    assert all(r["command"].startswith("python benchmarks/commongen/run.py") for r in rows)
    with pytest.raises(SystemExit, match="comes from both"):
        combine.combine([tmp_path / "a", tmp_path / "a"])
    other = json.loads((tmp_path / "b" / "results.json").read_text())
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "results.json").write_text(json.dumps({**other, "base": "some-other-model"}))
    with pytest.raises(SystemExit, match="another base"):
        combine.combine([tmp_path / "a", tmp_path / "c"])
    # the table is generated from the JSON file alone, and the same as when the file was written
    written = combine.main(
        ["--runs", str(tmp_path / "a"), str(tmp_path / "b"), "--json", str(tmp_path / "r.json")]
    )
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    assert combine.main(["--json", str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")]) == written
    assert "| test (4) | greedy | dinado-merge | 1 |" in (tmp_path / "r.md").read_text()


def test_combine_adds_a_later_runs_rows_to_an_existing_file(smoke, tmp_path):
    out, _ = smoke
    run = load_benchmark("commongen", "run.py")
    combine = load_benchmark("commongen", "combine.py")
    common = [
        "--quick", "--data-dir", str(DATA), "--base", str(out / "base"), "--train-sets", "10",
        "--samples-per-set", "2", "--samples", str(out / "samples.safetensors"), "--reuse-guides", str(out),
        "--dev-sets", "3", "--splits", "dev", "--no-efficiency", "--decodings", "greedy", "--best-of", "",
        "--max-new-tokens", "4", "--batch-size", "8",
    ]  # fmt: skip
    run.main([*common, "--output", str(tmp_path / "a"), "--systems", ""])
    run.main(
        [*common, "--output", str(tmp_path / "b"), "--systems", "dinado-soft", "--no-base", "--alpha", "2"]
    )
    run.main(
        [*common, "--output", str(tmp_path / "c"), "--systems", "dinado-soft", "--no-base", "--alpha", "4",
         "--candidates", "5"]
    )  # fmt: skip
    rows = tmp_path / "rows.json"
    combine.main(["--runs", str(tmp_path / "a"), "--json", str(rows)])
    (tmp_path / "a" / "results.json").unlink()  # the first run is gone; its rows live on in the file
    combine.main(["--runs", str(tmp_path / "b"), "--json", str(rows), "--add"])
    first = json.loads(rows.read_text())
    assert [(r["system"], r["strength"], r.get("candidates")) for r in first] == [
        ("base", None, None),
        ("dinado-soft", 2.0, None),
    ]
    assert {"word_lists", "loops", "sentence_success", "unfinished"} <= set(first[1])
    with pytest.raises(SystemExit, match="--replace"):
        combine.main(["--runs", str(tmp_path / "c"), "--json", str(rows), "--add"])
    assert json.loads(rows.read_text()) == first  # refused: nothing written
    table = combine.main(["--runs", str(tmp_path / "c"), "--json", str(rows), "--add", "--replace"])
    again = json.loads(rows.read_text())
    assert [(r["system"], r["strength"], r.get("candidates")) for r in again] == [
        ("base", None, None),
        ("dinado-soft", 4.0, 5),
    ]
    assert again[0] == first[0] and "| 4, top-5 |" in table
    # the sentence-success column: the value where a row has it, "–" for a row scored before loops were counted
    legacy = [{k: v for k, v in r.items() if k != "loops"} if r["system"] == "base" else r for r in again]
    rows.write_text(json.dumps(legacy))
    lines = {
        line.split(" | ")[2]: line
        for line in combine.main(["--json", str(rows)]).splitlines()
        if "| dev" in line
    }
    cells = {name: line.split(" | ")[5] for name, line in lines.items()}
    assert cells == {"base": "–", "dinado-soft": f"{again[1]['sentence_success']:.3f}"}


def test_combine_plots_every_guides_training_curves_in_one_png(smoke, tmp_path):
    out, _ = smoke
    combine = load_benchmark("commongen", "combine.py")
    trained = [
        n for n, i in json.loads((out / "results.json").read_text())["train"].items() if "cross_entropy" in i
    ]
    assert trained
    png = tmp_path / "curves.png"
    summary = combine.main(["--runs", str(out), "--curves", str(png), "--curves-only"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(f"| {name} |" in summary for name in trained)
    with pytest.raises(SystemExit, match="trained in both"):
        combine.main(["--runs", str(out), str(out), "--curves", str(png), "--curves-only"])
    with pytest.raises(SystemExit):
        combine.main(["--curves-only", "--curves", str(png)])  # no runs


def test_merge_entropy_profiles_the_runs_adapter_against_its_base(smoke, tmp_path):
    out, _ = smoke
    merge_entropy = load_benchmark("commongen", "merge_entropy.py")
    argv = ["--run", str(out), "--scales", "0,10000", "--samples", "5", "--output", str(tmp_path)]
    report = merge_entropy.main(argv)
    zero, big = report["rows"]
    # scale 0 folds in nothing: the base's own distribution; the two training steps' change scaled 10,000 times
    # moves it
    assert abs(zero["entropy"] - report["base_entropy"]) < 1e-4
    assert abs(zero["kl_q_p"]) < 1e-5 and abs(zero["kl_p_q"]) < 1e-5
    assert big["kl_q_p"] > 1e-3 and big["kl_p_q"] > 1e-3
    assert report["samples"] == 5 and report["tokens"] > 0
    assert json.loads((tmp_path / "merge_entropy.json").read_text()) == report
    assert "| 10000 |" in (tmp_path / "merge_entropy.md").read_text()


def test_completion_log_probs_reads_each_completion_at_its_own_positions(smoke):
    """Batched, right-padded teacher forcing gives each sample what it gets alone (padding never leaks in)."""
    from dinado.hf import load_model

    out, _ = smoke
    from dinado.evaluation import completion_log_probs

    samples = SampleSet.load(out / "samples.safetensors")
    model, tokenizer = load_model(str(out / "base"))
    model.eval()
    lengths = [len(p) + len(c) for p, c in zip(samples.prompts, samples.completions, strict=True)]
    indices = sorted(range(len(samples)), key=lambda i: lengths[i])[:2] + [
        max(range(len(samples)), key=lengths.__getitem__)
    ]
    batched = completion_log_probs(model, samples, indices, pad_id=0, batch_size=3)
    alone = completion_log_probs(model, samples, indices, pad_id=0, batch_size=1)
    assert len({lengths[i] for i in indices}) > 1  # the batch is padded
    for a, b, i in zip(batched, alone, indices, strict=True):
        assert a.shape == (len(samples.completions[i]), model.config.vocab_size)
        assert torch.allclose(a, b, atol=1e-4)
        assert torch.allclose(a.exp().sum(-1), torch.ones(len(a)), atol=1e-4)
        # position t predicts token t + 1: the completion's mean log-likelihood is minus the model's own loss
        ids = torch.tensor([samples.prompts[i] + samples.completions[i]])
        labels = ids.clone()
        labels[0, : len(samples.prompts[i])] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        taken = a.gather(-1, torch.tensor(samples.completions[i])[:, None])
        assert torch.allclose(taken.mean(), -loss, atol=1e-4)


def test_rescore_computes_a_runs_metrics_again_from_its_outputs(smoke, tmp_path):
    import shutil

    out, results = smoke
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("results.json", "outputs.json"):
        shutil.copy(out / name, run / name)
    spoiled = json.loads((run / "results.json").read_text())
    for row in spoiled[
        "rows"
    ]:  # as a machine without Java (METEOR None) and with wrong numbers would leave them
        row.update(meteor=None, bleu4=-1.0, success=-1.0, coverage=-1.0)
    (run / "results.json").write_text(json.dumps(spoiled))
    load_benchmark("commongen", "rescore.py").main(["--runs", str(run), "--rows-json"])
    again = json.loads((run / "results.json").read_text())
    assert len(again["rows"]) == len(results["rows"]) > 0
    for before, after in zip(results["rows"], again["rows"], strict=True):
        for key in ("meteor", "bleu4", "cider", "rouge_l", "success", "coverage"):
            assert after[key] == pytest.approx(before[key]), (after["outputs_key"], key)
        assert after["base_ppl"] == before["base_ppl"]  # kept: it needs the base model
    rows = json.loads((run / "rows.json").read_text())
    assert [r["meteor"] for r in rows] == [r["meteor"] for r in again["rows"]]


def test_rescore_refuses_rows_that_name_no_outputs(smoke, tmp_path):
    import shutil

    out, _ = smoke
    for name in ("results.json", "outputs.json"):
        shutil.copy(out / name, tmp_path / name)
    results = json.loads((tmp_path / "results.json").read_text())
    del results["rows"][0]["outputs_key"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="names no outputs"):
        load_benchmark("commongen", "rescore.py").main(["--runs", str(tmp_path)])


def test_demo_draws_label_gap_is_the_label_log_ratio_covariance_over_the_mean_label():
    draws = load_benchmark("commongen", "demo_draws.py")
    log_ratio = torch.tensor([1.0, -2.0, 0.5, 3.0])
    labels = torch.tensor([0.0, 1.0, 0.5, 0.25])
    cov = ((labels - labels.mean()) * (log_ratio - log_ratio.mean())).mean()
    assert draws.label_gap(log_ratio, labels) == pytest.approx(float(cov / labels.mean()))
    # a guide that raises every completion alike has no gap; one that raises the labelled ones has a positive one
    assert draws.label_gap(torch.full((4,), 2.0), labels) == pytest.approx(0.0, abs=1e-6)
    assert draws.label_gap(labels * 3, labels) > 0
    with pytest.raises(ValueError, match="every validation label is 0"):
        draws.label_gap(log_ratio, torch.zeros(4))


def test_demo_draws_arms_with_more_train_sets_contain_the_demos_and_share_one_selection_split(capsys):
    """The study pairs arms by seed: the first k sets of a larger draw are the demo's k, and the selection split
    (excluding the first --exclude-sets of the draw) is the same for every arm."""
    import random

    from dinado.tasks.commongen import load_split

    if not DATA.is_dir():
        pytest.skip(f"{DATA} is not present")
    train = load_split(DATA, "train")
    for seed in (0, 3):
        demo = random.Random(seed + 1).sample(train, 100)
        assert random.Random(seed + 1).sample(train, 400)[:100] == demo
    draws = load_benchmark("commongen", "demo_draws.py")
    with pytest.raises(SystemExit):
        draws.main(["--data-dir", str(DATA), "--train-sets", "200", "--exclude-sets", "100", "--output", "x"])
    assert "--exclude-sets (100) must be at least --train-sets (200)" in capsys.readouterr().err


def test_beams_keeps_every_beam_and_reranks_them_by_the_guides_terminal_value(smoke, tmp_path):
    out, results = smoke
    beams = load_benchmark("commongen", "beams.py")
    calibration = load_benchmark("commongen", "calibration.py")
    run_args = results["args"]
    _, model, tokenizer, fmt = load_benchmark("commongen", "run.py").open_run(out)
    from dinado import Guide
    from dinado.data import pad_prompts
    from dinado.text import encode_prompts

    prompt_ids = encode_prompts(tokenizer, ["dog frisbee catch", "tree climb"], prompt_format=fmt)
    width, eos = run_args["beams"], tokenizer.eos_token_id
    kept = beams.decode_beams(model, tokenizer, prompt_ids, width, run_args["max_new_tokens"], eos, 2)
    assert [len(group) for group in kept] == [width, width]
    # the first beam is what plain beam search returns
    ids, mask = pad_prompts(prompt_ids, tokenizer.pad_token_id, False)
    plain = model.generate(
        ids, attention_mask=mask, do_sample=False, num_beams=width, early_stopping=True,
        max_new_tokens=run_args["max_new_tokens"], eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    for group, row in zip(kept, plain[:, ids.shape[1] :].tolist(), strict=True):
        assert group[0] == (row[: row.index(eos) + 1] if eos in row else row)
    # batched terminal values equal the calibration instrument's one-sample-at-a-time value at the last token
    guide = Guide.from_pretrained(out / "guides" / "dinado-merge", model).eval()
    values = beams.beam_values(guide, prompt_ids, kept, batch_size=3)
    assert [len(group) for group in values] == [width, width]
    prompts = [prompt_ids[i] for i in range(2) for _ in range(width)]
    completions = [c for group in kept for c in group]
    samples = SampleSet.from_token_ids(prompts, completions, [0.0] * len(prompts))
    one_by_one = calibration.guide_prefix_values(
        guide, samples, [(i, len(c)) for i, c in enumerate(completions)]
    )
    values = [v for group in values for v in group]
    assert values == pytest.approx(one_by_one, abs=1e-5)
    assert all(0.0 < v <= 1.0 for v in values)

    report = beams.main(
        ["--run", str(out), "--sets", "3", "--scales", "0,1", "--batch-size", "4", "--output", str(tmp_path)]
    )
    assert [r["strength"] for r in report["rows"]] == [0.0, 1.0] and report["beams"] == width
    for r in report["rows"]:
        ceiling = r["oracle over beams"]["success"]
        assert r["top beam"]["changed"] == 0.0
        for pick in ("top beam", "value rerank", "value rerank, sentences"):
            assert r[pick]["sentence_success"] <= r[pick]["success"] <= ceiling + 1e-9
            assert (
                r[pick]["success"] <= r[pick]["coverage"] + 1e-9
                and r[pick]["bleu4"] >= 0.0 <= r[pick]["cider"]
            )
    assert json.loads((tmp_path / "beams.json").read_text()) == report
    assert "oracle over beams" in (tmp_path / "beams.md").read_text()
    assert report["split"] == "selection" and report["sets"] == 3
    # --split dev measures on dev's first sets instead (nothing is chosen there)
    on_dev = beams.main(
        [
            "--run",
            str(out),
            "--split",
            "dev",
            "--sets",
            "2",
            "--scales",
            "1",
            "--output",
            str(tmp_path / "dev"),
        ]
    )
    assert on_dev["split"] == "dev" and on_dev["sets"] == 2 and on_dev["concept_mix"] is None


def test_beams_value_pick_prefers_the_highest_value_then_the_better_ranked_beam():
    pick = load_benchmark("commongen", "beams.py").value_pick
    values = [0.1, 0.5, 0.5, 0.2]
    assert pick(values, None) == 1  # a tie goes to the beam search ranked higher
    assert pick(values, [True, False, False, True]) == 3  # the best among sentences
    assert pick(values, [False] * 4) == 1  # no sentence: among all beams


def test_beams_refuses_a_module_variant_at_a_strength(smoke, tmp_path):
    out, _ = smoke
    beams = load_benchmark("commongen", "beams.py")
    with pytest.raises(SystemExit, match="dinado-soft is a module variant"):
        beams.main(
            ["--run", str(out), "--variant", "dinado-soft", "--scales", "0,1", "--output", str(tmp_path)]
        )
    assert not (tmp_path / "beams.json").exists()


def test_beams_scores_each_pick_on_the_beams_it_picked(smoke, tmp_path, monkeypatch):
    out, _ = smoke
    beams = load_benchmark("commongen", "beams.py")
    _, _, tokenizer, _ = load_benchmark("commongen", "run.py").open_run(out)
    decoded, scored = [], []
    real_decode, real_metrics = beams.decode_beams, beams.commongen_metrics

    def decode(*args, **kwargs):
        decoded.append(real_decode(*args, **kwargs))
        return decoded[-1]

    def metrics(sets, texts):
        scored.append(list(texts))
        return real_metrics(sets, texts)

    monkeypatch.setattr(beams, "decode_beams", decode)
    monkeypatch.setattr(beams, "commongen_metrics", metrics)
    monkeypatch.setattr(
        beams, "value_pick", lambda values, sentences: len(values) - 1
    )  # always the last beam
    beams.main(["--run", str(out), "--sets", "3", "--scales", "1", "--output", str(tmp_path)])
    texts = [[tokenizer.decode(c, skip_special_tokens=True).strip() for c in group] for group in decoded[0]]
    assert scored[0] == [group[0] for group in texts]  # top beam
    assert scored[1] == scored[2] == [group[-1] for group in texts]  # the value picks
