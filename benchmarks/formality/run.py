"""Formality-controlled translation (CoCoA-MT, en->de or en->es): every guide beside the base and a supervised
baseline, steered toward formal and toward informal, in one command.

    python benchmarks/formality/run.py --pair en-de --output runs/formality-de               # pretrain here
    python benchmarks/formality/run.py --pair en-de --base runs/fm-base-de --output ...       # a local base
    python benchmarks/formality/run.py --pair en-de --base Helsinki-NLP/opus-mt-en-de ...      # a hub Marian

Stages (each one's wall time is recorded):

1. base: ``--base`` (any encoder-decoder or causal LM, a local directory or a hub id), or, without it, a small
   Marian trained here on the CoCoA-MT train pairs with both the formal and the informal reference as targets
   (:mod:`dinado.pretrain`, ``architecture="marian"``), so that it mixes registers.
2. classifier: ``--classifier DIR`` or one trained here on the formal vs informal train references
   (:func:`dinado.tasks.formality.train_formality_classifier`); its test accuracy on the references is reported.
3. sample: ``--samples-per-source`` translations of every train source from the base, labelled by the
   classifier (``--oracle soft``: P(formal); ``hard``: P(formal) >= 0.5). The informal direction reuses the
   same samples with the complementary labels (P(informal)).
4. train NADO, DiNADO-Soft and DiNADO-Merge for each direction; the supervised baseline: LoRA fine-tuning of
   the base on the references of the requested register only (the same train sources).
5. decode the test sources (greedy, or ``--beams``) with every system and score: the share judged formal by
   the classifier and by the rule-based T-V check (which also reports the share it cannot decide), and
   BLEU / chrF (sacrebleu) against the formal and against the informal references.

Writes ``results.json``, ``results.md`` and ``outputs.jsonl`` to ``--output``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import sacrebleu
import torch

from dinado import Guide, sample, train
from dinado._utils import atomic_write_text
from dinado.baselines import supervised_finetune
from dinado.classifier import evaluate_classifier
from dinado.hf import is_encoder_decoder, load_model
from dinado.oracles import ClassifierOracle, as_token_oracle
from dinado.tasks.formality import load_cocoa, train_formality_classifier, tv_register
from dinado.text import encode_prompts, generate_texts

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import logger  # noqa: E402

log = logger("formality", "stdout")

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cocoa-mt" / "CoCoA-MT"
VARIANTS = ("nado", "dinado-soft", "dinado-merge")
DIRECTIONS = ("formal", "informal")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="run directory (results.json/results.md go here)")
    p.add_argument("--pair", default="en-de", help="CoCoA-MT pair with a rule-based check: en-de or en-es")
    p.add_argument("--cocoa-root", default=str(DEFAULT_ROOT), help="the CoCoA-MT folder (train/, test/)")
    p.add_argument("--base", default=None, help="model directory or hub id (default: pretrain a Marian here)")
    p.add_argument("--classifier", default=None, help="formality classifier directory (default: train one)")
    p.add_argument("--oracle", choices=("soft", "hard"), default="soft", help="classifier probability or 0/1")
    p.add_argument("--samples-per-source", type=int, default=8)
    p.add_argument("--train-sources", type=int, default=0, help="use the first N train sources (0 = all)")
    p.add_argument("--test-sources", type=int, default=0, help="decode the first N test sources (0 = all)")
    p.add_argument("--guide-steps", type=int, default=300)
    p.add_argument("--train-batch-size", type=int, default=32)
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beams", type=int, default=1, help="1 = greedy decoding")
    p.add_argument("--batch-size", type=int, default=50, help="decoding/sampling batch (sources)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="guides to train, comma-separated")
    p.add_argument("--directions", default=",".join(DIRECTIONS), help="formal, informal or both")
    p.add_argument("--seed", type=int, default=0)
    # the base pretrained here when --base is absent (see docs/pretrain.md for the recipe)
    p.add_argument("--pretrain-layers", type=int, default=2)
    p.add_argument("--pretrain-embd", type=int, default=128)
    p.add_argument("--pretrain-vocab", type=int, default=4000)
    p.add_argument("--pretrain-epochs", type=float, default=40.0)
    p.add_argument("--pretrain-eval-every", type=int, default=23, help="steps between held-out evaluations")
    p.add_argument("--pretrain-patience", type=int, default=5, help="evaluations without improvement")
    p.add_argument("--pretrain-steps", type=int, default=None)
    # the classifier trained here when --classifier is absent
    p.add_argument("--classifier-epochs", type=int, default=10)
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.directions = [d.strip() for d in args.directions.split(",") if d.strip()]
    if unknown := sorted(set(args.variants) - set(VARIANTS)):
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if unknown := sorted(set(args.directions) - set(DIRECTIONS)):
        p.error(f"--directions: unknown {unknown}; choose from {', '.join(DIRECTIONS)}")
    args.lang = args.pair.split("-")[-1]
    if args.lang not in ("de", "es"):
        p.error(f"--pair {args.pair}: the rule-based check covers en-de and en-es only")
    return args


def timed(seconds: dict, name: str, fn, *a, **kw):
    """Run ``fn`` and record its wall time under ``name``."""
    log(f"{name} ...")
    start = time.perf_counter()
    result = fn(*a, **kw)
    seconds[name] = time.perf_counter() - start
    log(f"{name}: {seconds[name]:.1f} s")
    return result


def first(items: list, n: int) -> list:
    return list(items) if n <= 0 else list(items)[:n]


def build_base(args, run: Path, train, seconds: dict):
    """(model, tokenizer, where): the given base, or a small Marian pretrained on both registers here."""
    path = args.base
    if path is None:
        from dinado.pretrain import PretrainConfig, pretrain

        data = run / "base-data"
        data.mkdir(parents=True, exist_ok=True)
        sources = [e.source for e in train for _ in range(2)]
        targets = [t for e in train for t in (e.formal, e.informal)]
        atomic_write_text(data / "source.txt", "\n".join(sources) + "\n")
        atomic_write_text(data / "target.txt", "\n".join(targets) + "\n")
        config = PretrainConfig(
            data_format="pairs",
            architecture="marian",
            source_file=str(data / "source.txt"),
            target_file=str(data / "target.txt"),
            vocab_size=args.pretrain_vocab,
            n_layer=args.pretrain_layers,
            n_embd=args.pretrain_embd,
            n_head=4,
            context=128,
            max_epochs=args.pretrain_epochs,
            max_steps=args.pretrain_steps,
            validation_fraction=0.1,
            eval_every=args.pretrain_eval_every,
            patience=args.pretrain_patience,
            seed=args.seed,
        )
        path = str(run / "base")
        timed(seconds, "pretrain base", pretrain, config, path, progress=False, overwrite=True)
    model, tokenizer = load_model(path)
    return model, tokenizer, path


def build_classifier(args, run: Path, seconds: dict) -> str:
    if args.classifier is not None:
        return args.classifier
    path = run / "classifier"
    timed(
        seconds,
        "train classifier",
        train_formality_classifier,
        args.cocoa_root,
        args.pair,
        path,
        epochs=args.classifier_epochs,
        seed=args.seed,
        overwrite=True,
    )
    return str(path)


def score(texts: list[str], sources: list[str], test, classifier: ClassifierOracle, lang: str) -> dict:
    """Formal shares (classifier, rules) and BLEU/chrF against both reference sets."""
    p_formal = classifier(sources, texts)
    registers = [tv_register(t, lang) for t in texts]
    n = len(texts)
    row = {
        "formal_classifier": sum(p >= 0.5 for p in p_formal) / n,
        "formal_rules": registers.count("formal") / n,
        "informal_rules": registers.count("informal") / n,
        "undecided_rules": registers.count(None) / n,
    }
    for register in DIRECTIONS:
        refs = [getattr(e, register) for e in test]
        row[f"bleu_{register}"] = sacrebleu.corpus_bleu(texts, [refs]).score
        row[f"chrf_{register}"] = sacrebleu.corpus_chrf(texts, [refs]).score
    row["mean_words"] = sum(len(t.split()) for t in texts) / n
    return row


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # measured: 1 thread is fastest for these model sizes on shared 2-core machines
    run = Path(args.output)
    run.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    train_set = first(load_cocoa(args.cocoa_root, args.pair, "train"), args.train_sources)
    test = first(load_cocoa(args.cocoa_root, args.pair, "test"), args.test_sources)
    log(f"{args.pair}: {len(train_set)} train sources, {len(test)} test sources")

    model, tokenizer, base_path = build_base(args, run, train_set, seconds)
    seq2seq = is_encoder_decoder(model)
    classifier_path = build_classifier(args, run, seconds)
    judge = ClassifierOracle.from_pretrained(classifier_path, "formal", threshold=0.5, batch_size=64)
    classifier_test_accuracy = evaluate_classifier(
        judge.model,
        judge.tokenizer,
        [e.formal for e in test] + [e.informal for e in test],
        ["formal"] * len(test) + ["informal"] * len(test),
    )["accuracy"]
    log(f"classifier accuracy on the test references: {classifier_test_accuracy:.3f}")

    oracle_kw = {"soft": True} if args.oracle == "soft" else {"threshold": 0.5}
    formal_oracle = ClassifierOracle.from_pretrained(classifier_path, "formal", batch_size=64, **oracle_kw)
    sources = [e.source for e in train_set]
    samples = timed(
        seconds,
        "sample from the base",
        sample,
        model,
        encode_prompts(tokenizer, sources, seq2seq),
        args.samples_per_source,
        as_token_oracle(formal_oracle, tokenizer),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size * 2,
        seed=args.seed,
        tokenizer=tokenizer,
    )
    samples.save(run / "samples.safetensors")
    by_direction = {"formal": samples}
    if "informal" in args.directions:
        flipped = (
            [1.0 - float(v) for v in samples.labels]
            if args.oracle == "soft"
            else [float(v < 0.5) for v in samples.labels]
        )
        by_direction["informal"] = samples.with_labels(flipped)
        by_direction["informal"].save(run / "samples-informal.safetensors")
    log(f"{len(samples)} samples, mean formal label {samples.positive_rate:.3f}")

    systems: dict[str, object] = {"base": model}
    train_info: dict[str, dict] = {}
    for direction in args.directions:
        for variant in args.variants:
            name = f"{variant} -> {direction}"
            base = copy.deepcopy(model) if variant == "dinado-merge" else model
            torch.manual_seed(args.seed)  # each guide's initialisation independent of the stages before it
            guide = Guide.create(base, variant, tokenizer=tokenizer, num_layers=2, lora_r=8, lora_alpha=16)
            report = timed(
                seconds,
                f"train {name}",
                train,
                guide,
                by_direction[direction],
                max_steps=args.guide_steps,
                batch_size=args.train_batch_size,
                seed=args.seed,
            )
            guide.save_pretrained(run / "guides" / f"{variant}-{direction}")
            train_info[name] = {"final_loss": report.loss[-1], "steps": report.steps}
            systems[name] = guide.merge() if variant == "dinado-merge" else guide
        targets = [getattr(e, direction) for e in train_set]
        tuned, info = timed(
            seconds,
            f"train sft -> {direction}",
            supervised_finetune,
            model,
            tokenizer,
            sources,
            targets,
            max_steps=args.sft_steps,
            batch_size=args.train_batch_size,
            seed=args.seed,
        )
        systems[f"sft-lora -> {direction}"] = tuned
        train_info[f"sft-lora -> {direction}"] = {
            "final_loss": info["train_loss_last"],
            "steps": info["steps"],
        }

    test_sources = [e.source for e in test]
    gen_kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        num_beams=args.beams,
        pad_token_id=tokenizer.pad_token_id,
    )
    rows, outputs = [], {}
    for name, source in systems.items():
        key = f"decode {name}"
        texts, _, _ = timed(
            seconds, key, generate_texts, source, tokenizer, test_sources, args.batch_size, **gen_kwargs
        )
        outputs[name] = texts
        direction = name.split(" -> ")[-1] if " -> " in name else None
        rows.append(
            {
                "system": name,
                "direction": direction,
                "train_oracle_calls": len(samples) if name.split(" -> ")[0] in VARIANTS else 0,
                "decode_seconds": seconds[key],
                **score(texts, test_sources, test, judge, args.lang),
            }
        )
        print(table([rows[-1]]), flush=True)

    results = {
        "command": "python benchmarks/formality/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "args": {k: v for k, v in vars(args).items()},
        "base": base_path,
        "classifier": classifier_path,
        "classifier_test_accuracy": classifier_test_accuracy,
        "train_sources": len(train_set),
        "test_sources": len(test),
        "samples": len(samples),
        "mean_formal_label": samples.positive_rate,
        "rows": rows,
        "train": train_info,
        "seconds": seconds,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": 1},
    }
    atomic_write_text(run / "results.json", json.dumps(results, indent=2))
    atomic_write_text(run / "results.md", results_markdown(results))
    lines = [
        json.dumps({"source": s, **{name: outputs[name][i] for name in outputs}}, ensure_ascii=False)
        for i, s in enumerate(test_sources)
    ]
    atomic_write_text(run / "outputs.jsonl", "\n".join(lines) + "\n")
    print(table(rows), flush=True)
    return results


COLUMNS = (
    ("system", "system", None),
    ("formal (clf)", "formal_classifier", "pct"),
    ("formal (rules)", "formal_rules", "pct"),
    ("informal (rules)", "informal_rules", "pct"),
    ("undecided", "undecided_rules", "pct"),
    ("BLEU formal", "bleu_formal", "num"),
    ("BLEU informal", "bleu_informal", "num"),
    ("chrF formal", "chrf_formal", "num"),
    ("chrF informal", "chrf_informal", "num"),
    ("words", "mean_words", "num"),
    ("decode s", "decode_seconds", "num"),
)


def _cell(value, kind) -> str:
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "num":
        return f"{value:.1f}"
    return str(value)


def table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_cell(r[key], kind) for _, key, kind in COLUMNS) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def results_markdown(results: dict) -> str:
    stages = "\n".join(f"| {k} | {v:.1f} |" for k, v in results["seconds"].items())
    return (
        f"# Formality-controlled translation, {results['args']['pair']}\n\n"
        f"Command: `{results['command']}`\n\n"
        f"Base: `{results['base']}`; classifier: `{results['classifier']}` (accuracy on the "
        f"{2 * results['test_sources']} test references: {100 * results['classifier_test_accuracy']:.1f}%).\n"
        f"{results['samples']} samples from the base on {results['train_sources']} train sources, mean formal "
        f"label {results['mean_formal_label']:.3f}; {results['test_sources']} test sources.\n\n"
        f"{table(results['rows'])}\n\n| stage | seconds |\n|---|---|\n{stages}\n"
    )


if __name__ == "__main__":
    main()
