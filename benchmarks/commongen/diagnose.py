"""Does a trained guide's value R generalise? AUC of its terminal value against the oracle label.

    python benchmarks/commongen/diagnose.py --run runs/commongen --base runs/cg-base

For each guide saved by run.py, the terminal prefix value R(x) (the guide's estimate of P(C = 1 | x), which
should be the label itself at the end of a sequence) is compared with the oracle label by ROC AUC on:
(a) the training samples themselves, (b) fresh samples from p for the same training concept sets and
(c) samples from p for training concept sets the guides never saw. AUC 0.5 = no better than chance.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dinado import Guide, SampleSet, sample, sequence_log_values
from dinado.oracles import as_token_oracle
from dinado.tasks.commongen import coverage_oracle, load_split
from dinado.text import encode_prompts


def auc(scores: list[float], labels: list[float]) -> float | None:
    """ROC AUC by the rank-sum formula (ties count half); None without both classes."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y > 0.5]
    neg = [s for s, y in zip(scores, labels, strict=True) if y <= 0.5]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", required=True, help="an output directory of run.py (guides/, samples.safetensors)"
    )
    p.add_argument("--base", required=True, help="the base model the guides were trained on")
    p.add_argument(
        "--data-dir", default=None, help="CommonGen v1.1 files (default: from the run's results.json)"
    )
    p.add_argument("--sets", type=int, default=250, help="concept sets per evaluation pool")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    results = json.loads((run / "results.json").read_text())
    data_dir = args.data_dir or results["args"]["data_dir"]
    model = AutoModelForCausalLM.from_pretrained(args.base).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    train_samples = SampleSet.load(run / "samples.safetensors")
    seen_prompts = list(dict.fromkeys(tokenizer.decode(p) for p in train_samples.prompts))
    seen = set(seen_prompts)
    unseen_prompts = [s.prompt for s in load_split(data_dir, "train") if s.prompt not in seen]
    rng = random.Random(args.seed)
    pools = {
        "training samples": train_samples.subset(range(min(len(train_samples), args.sets * 8))),
    }
    oracle = as_token_oracle(coverage_oracle(), tokenizer)
    k = results["args"]["samples_per_set"]
    for name, prompts, seed in (
        ("fresh samples, seen concept sets", rng.sample(seen_prompts, args.sets), args.seed + 11),
        ("fresh samples, unseen concept sets", rng.sample(unseen_prompts, args.sets), args.seed + 12),
    ):
        pools[name] = sample(
            model, encode_prompts(tokenizer, prompts), k, oracle, results["args"]["max_new_tokens"], seed=seed
        )
    table = {}
    for variant in ("nado", "dinado-hard", "dinado-soft", "dinado-merge"):
        path = run / "guides" / variant
        if not path.is_dir():
            continue
        base = AutoModelForCausalLM.from_pretrained(args.base).eval() if variant == "dinado-merge" else model
        guide = Guide.from_pretrained(path, base).eval()
        table[variant] = {}
        for name, pool in pools.items():
            scores = sequence_log_values(guide, pool, 64).tolist()
            table[variant][name] = auc(scores, pool.labels.tolist())
    print("| guide | " + " | ".join(f"AUC, {n} (positives)" for n in pools) + " |")
    print("|---|" + "---|" * len(pools))
    for variant, row in table.items():
        cells = [
            f"{row[n]:.3f} ({pools[n].positive_rate:.1%})" if row[n] is not None else "n/a" for n in pools
        ]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    return table


if __name__ == "__main__":
    main()
