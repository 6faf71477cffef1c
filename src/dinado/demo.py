"""`dinado demo` (and `make demo`): keyword-constrained generation in the project's own toy language.

1. Writes a corpus of "concepts = sentence" pairs from the toy grammar (dinado.tasks.toy_language).
2. Pretrains a small GPT-2 base on it (cached in the run directory: a second run reuses it).
3. Samples completions from the base for training concept sets and labels them with the keyword oracle.
4. Trains NADO, DiNADO-Soft and DiNADO-Merge guides on those samples.
5. Samples from the base and each guide on held-out concept sets (combinations never seen in training) and
   prints one table: oracle success, keyword coverage, base perplexity of the outputs, tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ._utils import atomic_write_text
from .evaluation import evaluate_texts, markdown_report, plot_training_curves
from .guide import Guide
from .oracles import as_token_oracle
from .pretrain import PretrainConfig, pretrain
from .sampling import sample
from .tasks.commongen import coverage_oracle
from .tasks.toy_language import ToyLanguage
from .text import generate_texts
from .training import train

BASE_CONFIG = dict(
    data_format="pairs",
    vocab_size=1000,
    n_layer=2,
    n_embd=128,
    n_head=4,
    context=40,
    dropout=0.0,
    batch_size=64,
    learning_rate=2e-3,
    max_steps=400,
    max_epochs=None,
    eval_every=50,
    patience=3,
)


def _log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _corpus(root: Path, num_train: int, num_test: int, seed: int) -> tuple[list[str], list[str]]:
    """Write train pairs; return (training prompts, held-out prompts whose concept set never occurs in train)."""
    train_examples = ToyLanguage(seed).examples(num_train)
    seen = {tuple(sorted(e.concepts)) for e in train_examples}
    held_out, language = [], ToyLanguage(seed + 1)
    while len(held_out) < num_test:
        e = language.example()
        if tuple(sorted(e.concepts)) not in seen and e.prompt not in held_out:
            held_out.append(e.prompt)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "train_src.txt", "\n".join(e.prompt for e in train_examples) + "\n")
    atomic_write_text(root / "train_tgt.txt", "\n".join(e.sentence for e in train_examples) + "\n")
    atomic_write_text(root / "heldout_prompts.txt", "\n".join(held_out) + "\n")
    prompts = list(dict.fromkeys(e.prompt for e in train_examples))
    return prompts, held_out


def _base(run: Path, data: Path, seed: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = PretrainConfig(
        source_file=str(data / "train_src.txt"),
        target_file=str(data / "train_tgt.txt"),
        seed=seed,
        **BASE_CONFIG,
    )
    base_dir = run / "base"
    saved = base_dir / "pretrain_config.json"
    if saved.is_file() and json.loads(saved.read_text()) == config.to_dict():
        _log(f"reusing the pretrained base in {base_dir}")
    else:
        _log(f"pretraining a {config.n_layer}-layer, {config.n_embd}-wide GPT-2 on {data / 'train_src.txt'}")
        result = pretrain(config, base_dir, overwrite=True)
        _log(
            f"base: {result.num_parameters:,} parameters, held-out loss {result.best_val_loss:.3f}, "
            f"{result.wall_seconds:.0f} s"
        )
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    return model, tokenizer


def run_demo(output: str, seed: int = 0, quick: bool = False, threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    start = time.perf_counter()
    run = Path(output)
    run.mkdir(parents=True, exist_ok=True)
    train_prompts, held_out = _corpus(run / "data", 20_000, 60 if quick else 150, seed)
    model, tokenizer = _base(run, run / "data", seed)
    oracle = coverage_oracle()
    token_oracle = as_token_oracle(oracle, tokenizer)
    encode = lambda texts: [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    num_prompts, per_prompt = (150, 8) if quick else (600, 8)
    _log(f"sampling {per_prompt} completions for each of {num_prompts} training concept sets from the base")
    samples = sample(
        model,
        encode(train_prompts[:num_prompts]),
        per_prompt,
        token_oracle,
        max_new_tokens=24,
        batch_size=200,
        seed=seed,
        tokenizer=tokenizer,
        progress=True,
    )
    samples.save(run / "samples.safetensors")
    _log(f"{len(samples)} samples, {samples.positive_rate:.1%} cover all their concepts")

    gen_kwargs = dict(max_new_tokens=24, do_sample=True, top_k=0, pad_token_id=tokenizer.pad_token_id)
    variants = ["nado", "dinado-soft"] if quick else ["nado", "dinado-soft", "dinado-merge"]
    steps = 150 if quick else 450
    systems: dict[str, object] = {"base": model}
    curves = {}
    for variant in variants:
        # a guide never changes the model it is given (Merge's LoRA goes into its own module tree), so the same
        # base serves every variant and stays the base in the table
        guide = Guide.create(model, variant, tokenizer=tokenizer, num_layers=2, lora_r=8, lora_alpha=16)
        _log(f"training {variant} for {steps} steps")
        records: list[dict] = []
        train(
            guide,
            samples,
            max_steps=steps,
            batch_size=32,
            seed=seed,
            progress=True,
            on_step=lambda step, values, records=records: records.append({"step": step, **values}),
        )
        guide.save_pretrained(run / "guides" / variant)
        curves[variant] = records
        systems[variant] = guide.merge() if variant == "dinado-merge" else guide

    results, outputs = {}, {}
    for name, source in systems.items():
        torch.manual_seed(seed)
        texts, new_tokens, seconds = generate_texts(source, tokenizer, held_out, 50, **gen_kwargs)
        outputs[name] = texts
        results[name] = evaluate_texts(held_out, texts, oracle, model=model, tokenizer=tokenizer)
        results[name]["tokens_per_second"] = new_tokens / max(seconds, 1e-9)

    atomic_write_text(run / "metrics.json", json.dumps(results, indent=2))
    examples = [{"prompt": p, **{n: outputs[n][i] for n in systems}} for i, p in enumerate(held_out[:12])]
    atomic_write_text(run / "report.md", markdown_report(results, examples, list(systems)))
    for variant, records in curves.items():
        plot_training_curves(records, run / f"training_curves_{variant}.png")

    print(f"\nHeld-out concept sets: {len(held_out)} (combinations never seen in training); sampling, T=1\n")
    print("| system       | success | coverage | base ppl | distinct-2 | tokens/s |")
    print("|--------------|---------|----------|----------|------------|----------|")
    for name, m in results.items():
        print(
            f"| {name:<12} | {m['success']:7.3f} | {m['coverage']:8.3f} | {m['base_perplexity']:8.2f} | "
            f"{m['distinct_2']:10.3f} | {m['tokens_per_second']:8.0f} |"
        )
    print("\nExamples:")
    for ex in examples[:4]:
        print(f"  {ex['prompt']}")
        for name in systems:
            print(f"    {name:<12} {ex[name]}")
    print(
        f"\nReport: {run / 'report.md'}; plots: {run}/training_curves_*.png; total {time.perf_counter() - start:.0f} s"
    )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dinado demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--output", default="runs/demo", help="run directory (default runs/demo; the base is cached there)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smaller run (for smoke tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    run_demo(args.output, args.seed, args.quick, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
