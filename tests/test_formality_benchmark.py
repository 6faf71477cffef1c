"""Smoke test of benchmarks/formality/run.py on a slice of CoCoA-MT en-de (the whole pipeline, tiny sizes)."""

import json
from pathlib import Path

import pytest

from .conftest import SHARED_DATA, load_benchmark

ROOT = SHARED_DATA / "cocoa-mt" / "CoCoA-MT"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    if not ROOT.is_dir():
        pytest.skip(f"{ROOT} is not present")
    out = tmp_path_factory.mktemp("formality") / "run"
    argv = [
        "--pair", "en-de", "--output", str(out), "--cocoa-root", str(ROOT),
        "--pretrain-steps", "3", "--pretrain-layers", "1", "--pretrain-embd", "32", "--pretrain-vocab", "300",
        "--classifier-epochs", "1", "--train-sources", "8", "--test-sources", "6", "--samples-per-source", "2",
        "--guide-steps", "2", "--sft-steps", "2", "--max-new-tokens", "8", "--batch-size", "4",
    ]  # fmt: skip
    return out, load_benchmark("formality", "run.py").main(argv)


def test_every_system_in_both_directions_is_scored_on_the_test_sources(smoke):
    out, results = smoke
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == results["rows"]
    expected = {"base"} | {
        f"{system} -> {d}"
        for system in ("nado", "dinado-soft", "dinado-merge", "sft-lora")
        for d in ("formal", "informal")
    }
    assert {r["system"] for r in results["rows"]} == expected
    assert results["test_sources"] == 6 and results["samples"] == 16
    for r in results["rows"]:
        shares = r["formal_rules"] + r["informal_rules"] + r["undecided_rules"]
        assert abs(shares - 1.0) < 1e-9 and 0.0 <= r["formal_classifier"] <= 1.0
        for key in ("bleu_formal", "bleu_informal", "chrf_formal", "chrf_informal"):
            assert 0.0 <= r[key] <= 100.0
        guided = r["system"].split(" -> ")[0] in ("nado", "dinado-soft", "dinado-merge")
        assert r["train_oracle_calls"] == (16 if guided else 0)
    outputs = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(outputs) == 6 and set(outputs[0]) == {"source"} | expected
    assert "| dinado-merge -> informal |" in (out / "results.md").read_text()
    assert {"pretrain base", "train classifier", "sample from the base", "train sft -> formal"} <= set(
        results["seconds"]
    )
    assert 0.0 <= results["classifier_test_accuracy"] <= 1.0


def test_the_informal_direction_reuses_the_samples_with_complementary_labels(smoke):
    from dinado import SampleSet

    out, results = smoke
    samples = SampleSet.load(out / "samples.safetensors")
    assert samples.decoder_start_token_id is not None  # the pretrained base is an encoder-decoder
    assert abs(samples.positive_rate - results["mean_formal_label"]) < 1e-6
    informal = SampleSet.load(out / "samples-informal.safetensors")
    assert informal.completions == samples.completions and informal.prompts == samples.prompts
    assert (informal.labels + samples.labels - 1.0).abs().max() < 1e-6
    assert samples.labels.min() < samples.labels.max()  # soft classifier labels, not all equal


def _opus_like_marian(path: Path) -> None:
    """What Helsinki-NLP/opus-mt-* holds, tiny: a MarianMTModel with a SentencePiece MarianTokenizer."""
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    from dinado.tasks.formality import load_cocoa

    texts = [t for e in load_cocoa(ROOT, "en-de", "train")[:60] for t in (e.source, e.formal, e.informal)]
    work = path.parent / "spm"
    work.mkdir()
    (work / "corpus.txt").write_text("\n".join(texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "spm"), vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2,
    )  # fmt: skip
    processor = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    vocab = {processor.id_to_piece(i): i for i in range(processor.get_piece_size())}
    (work / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    spm_file = str(work / "spm.model")
    tokenizer = MarianTokenizer(source_spm=spm_file, target_spm=spm_file, vocab=str(work / "vocab.json"))
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(vocab), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1,
    )  # fmt: skip
    MarianMTModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def test_a_hub_style_marian_with_its_sentencepiece_tokenizer_runs_the_same_pipeline(smoke, tmp_path):
    """--base takes a Marian directory laid out like an OPUS-MT checkpoint (a hub id resolves to one)."""
    from dinado import SampleSet

    first_run, _ = smoke
    base = tmp_path / "opus-like"
    _opus_like_marian(base)
    out = tmp_path / "run"
    argv = [
        "--pair", "en-de", "--output", str(out), "--cocoa-root", str(ROOT), "--base", str(base),
        "--classifier", str(first_run / "classifier"), "--variants", "dinado-soft,dinado-merge",
        "--directions", "formal", "--train-sources", "6", "--test-sources", "4", "--samples-per-source", "2",
        "--guide-steps", "2", "--sft-steps", "2", "--max-new-tokens", "8", "--batch-size", "4",
    ]  # fmt: skip
    results = load_benchmark("formality", "run.py").main(argv)
    assert {r["system"] for r in results["rows"]} == {
        "base", "dinado-soft -> formal", "dinado-merge -> formal", "sft-lora -> formal",
    }  # fmt: skip
    assert "pretrain base" not in results["seconds"] and results["base"] == str(base)
    samples = SampleSet.load(out / "samples.safetensors")
    assert samples.decoder_start_token_id == 0  # the pad id, as OPUS-MT models start their decoder
    assert all(p[-1] == 1 for p in samples.prompts)  # each source ends with the SentencePiece </s>
