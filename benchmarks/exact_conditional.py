"""Do the guides learn a *rule*? The exact conditional testbed (dinado.exact, method.md §6).

Prompts ``[BOS, k]`` name a keyword k; the oracle asks that k appear in the completion. The base is a tiny
GPT-2 first taught to copy the named token now and then (``exact.copy_base``), as a pretrained LM can. Each
guide is trained on exact samples from p for the *seen* keywords only, then scored with exact sums on every
completion of every prompt: KL(q*‖q_theta) and success on the seen keywords and on *held-out* keywords it never
saw. A guide that only learned "boost the tokens that were in positives" helps the seen prompts and leaves the
held-out ones at the base (or worse); one that learned "boost the token the prompt names" helps both.

    python benchmarks/exact_conditional.py            # every variant x head option (about 15 min, 1 thread)
    python benchmarks/exact_conditional.py --quick    # fewer steps and samples (about 4 min)

A markdown table goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import dinado
from dinado import exact
from dinado._utils import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.common
from benchmarks.common import logger  # noqa: E402

log = logger()

# (label, variant, Guide.create options)
SYSTEMS = [
    # without the pointer (the module variants' only option before it)
    ("nado, no pointer", "nado", {"pointer": False}),
    ("dinado-hard, no pointer", "dinado-hard", {"pointer": False}),
    ("dinado-soft, no pointer", "dinado-soft", {"pointer": False}),
    ("nado tied+tokens, no pointer", "nado", {"head": "tied", "read_tokens": True, "pointer": False}),
    ("hard tied+tokens, no pointer", "dinado-hard", {"head": "tied", "read_tokens": True, "pointer": False}),
    ("soft tied, no pointer", "dinado-soft", {"head": "tied", "pointer": False}),
    ("soft tokens, no pointer", "dinado-soft", {"read_tokens": True, "pointer": False}),
    ("soft tied+tokens, no pointer", "dinado-soft", {"head": "tied", "read_tokens": True, "pointer": False}),
    ("dinado-merge", "dinado-merge", {}),
    # the defaults (pointer on)
    ("nado", "nado", {}),
    ("dinado-hard", "dinado-hard", {}),
    ("dinado-soft", "dinado-soft", {}),
    ("soft tied+tokens+pointer", "dinado-soft", {"head": "tied", "read_tokens": True}),
    # the heads of the decoding-cost issue (pointer on): what each costs in KL against the full head
    ("soft tied", "dinado-soft", {"head": "tied"}),
    ("soft tied rank 8", "dinado-soft", {"head": "tied", "head_rank": 8}),
    ("soft full rank 8", "dinado-soft", {"head_rank": 8}),
]
# decode-time candidate restriction: the default DiNADO-Soft guide scored as q_k for each k
CANDIDATES = (4, 8)
FULL = {"per_prompt": 1000, "steps": 1500}
QUICK = {"per_prompt": 300, "steps": 400}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--vocab", type=int, default=28, help="vocabulary (keywords are 1 .. V-1)")
    parser.add_argument("--held-out", type=int, default=6, help="keywords kept out of training")
    parser.add_argument("--max-new-tokens", type=int, default=exact.COND_MAX_NEW_TOKENS)
    parser.add_argument("--copy-rate", type=float, default=0.08, help="the base's pretraining copy rate")
    parser.add_argument("--per-prompt", type=int, default=None, help="samples per seen keyword")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--systems", default=None, help="labels of SYSTEMS separated by ';' (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--candidates",
        type=lambda text: [int(k) for k in text.split(",") if k],
        default=list(CANDIDATES),
        help="top-k candidate counts to score the dinado-soft guide with, comma-separated",
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    per_prompt = args.per_prompt or preset["per_prompt"]
    steps = args.steps or preset["steps"]
    chosen = SYSTEMS
    if args.systems:
        wanted = [s.strip() for s in args.systems.split(";")]
        unknown = sorted(set(wanted) - {label for label, _, _ in SYSTEMS})
        if unknown:
            parser.error(f"unknown systems {unknown}; choose from {[label for label, _, _ in SYSTEMS]}")
        chosen = [s for s in SYSTEMS if s[0] in wanted]
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    base = exact.copy_base(
        args.seed, vocab_size=args.vocab, copy_rate=args.copy_rate, max_new_tokens=args.max_new_tokens
    )
    seen, held_out = exact.conditional_split(args.vocab, args.held_out, args.seed)
    start = exact.evaluate_conditional(dinado.Guide.create(base, "nado"), seen, held_out, args.max_new_tokens)
    samples = exact.draw_conditional(start.seen, per_prompt, seed=args.seed)
    log(
        f"base: copy rate {args.copy_rate}, {len(seen)} seen + {len(held_out)} held-out keywords, "
        f"{len(samples):,} samples ({samples.positive_rate:.1%} positive), {steps} steps of {args.batch_size} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    base_summary = start.summary()
    rows = [{"system": "base p", **base_summary, "seconds": 0.0}]  # an untrained guide: q_theta = p exactly
    for label, variant, options in chosen:
        t = time.perf_counter()
        torch.manual_seed(args.seed)
        guide = dinado.Guide.create(base, variant, **options)
        dinado.train(guide, samples, max_steps=steps, batch_size=args.batch_size, seed=args.seed)
        seconds = time.perf_counter() - t
        result = exact.evaluate_conditional(guide, seen, held_out, args.max_new_tokens)
        rows.append({"system": label, **result.summary(), "seconds": seconds})
        report(rows[-1])
        if label == "dinado-soft":
            for k in args.candidates:
                result = exact.evaluate_conditional(guide, seen, held_out, args.max_new_tokens, candidates=k)
                rows.append(
                    {"system": f"dinado-soft, top-{k} candidates", **result.summary(), "seconds": seconds}
                )
                report(rows[-1])
    print(table(rows, base_summary))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return rows


def report(row: dict) -> None:
    log(
        f"{row['system']:<18} seen KL {row['seen_kl_q_star_q']:.3f} success {row['seen_success_q']:.3f} | held "
        f"out KL {row['held_out_kl_q_star_q']:.3f} success {row['held_out_success_q']:.3f} ({row['seconds']:.0f} s)"
    )


def table(rows: list[dict], base: dict) -> str:
    lines = [
        "| system | seen KL(q*‖q) | seen success | held-out KL(q*‖q) | held-out KL cut | held-out success | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cut = 1.0 - r["held_out_kl_q_star_q"] / base["held_out_kl_q_star_p"]
        lines.append(
            f"| {r['system']} | {r['seen_kl_q_star_q']:.3f} | {r['seen_success_q']:.3f} | "
            f"{r['held_out_kl_q_star_q']:.3f} | {cut:+.0%} | {r['held_out_success_q']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
