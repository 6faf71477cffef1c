"""How much of the SmolLM2 demo's result is the draw of its short DiNADO-Merge training? (docs/demo.md)

One demo seed's training draw (``--train-sets`` CommonGen train concept sets x ``--samples-per-set`` samples from
the base, drawn as ``dinado demo`` draws them, soft coverage labels), then the demo's Merge recipe (20 steps of 32
at 2e-3, AdamW epsilon ``--adam-epsilon``, LoRA r 8 on the top 6 layers, the entropy check at scales 12 / 9 / 6,
no retry) from ``--inits``
initialisations (guide seeds seed, seed + 1, ...), each merged at the scale its check chose and sampled (T = 1) on
``--selection-sets`` train concept sets with dev's concept mix (``strength.selection_split``) that none of the
first ``--exclude-sets`` sets of the seed's training draw is in (so arms with different ``--train-sets`` up to
that number share one split). Never dev.

``--validation-sets M`` also scores each adapter, from training data only, on the base's samples (4 per set) of
M more train sets: gap = Cov(s, D) / mean(s), D = log q(x) - log p(x) of each completion under the merged model
at scale 12, s its covered share. The question was whether it tells strong adapters from weak ones before any
decoding (it did not). Writes ``--output`` (JSON) after every adapter.

    python benchmarks/commongen/demo_draws.py --data-dir ../shared/data/commongen/v1.1_LHRYANG --seed 0 \
        --inits 4 --output runs/draws-s0.json --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.commongen.strength import selection_split  # noqa: E402
from dinado._utils import atomic_write_text  # noqa: E402
from dinado.demo import COMMONGEN_RECIPE, _fit, _merge_checked, _sample_and_score  # noqa: E402
from dinado.evaluation import completion_log_probs  # noqa: E402
from dinado.guide import Guide  # noqa: E402
from dinado.hf import load_model  # noqa: E402
from dinado.oracles import as_token_oracle  # noqa: E402
from dinado.sampling import relabel, sample, sample_with_features  # noqa: E402
from dinado.tasks.commongen import INSTRUCTION, coverage_oracle, load_split  # noqa: E402
from dinado.text import PromptFormat, encode_prompts, end_of_turn_id  # noqa: E402


def label_gap(log_ratio: torch.Tensor, labels: torch.Tensor) -> float:
    """Cov(labels, log_ratio) / mean(labels): how much more the guide raises completions with higher labels."""
    if float(labels.sum()) <= 0:
        raise ValueError("every validation label is 0: the gap is undefined")
    return float((labels * log_ratio).sum() / labels.sum() - log_ratio.mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--seed", type=int, default=0, help="the demo seed whose training draw is used")
    ap.add_argument("--train-sets", type=int, default=COMMONGEN_RECIPE["train_sets"])
    ap.add_argument("--samples-per-set", type=int, default=COMMONGEN_RECIPE["samples_per_set"])
    ap.add_argument("--inits", type=int, default=1)
    ap.add_argument("--selection-sets", type=int, default=100)
    ap.add_argument("--exclude-sets", type=int, default=400)
    ap.add_argument("--validation-sets", type=int, default=0)
    ap.add_argument(
        "--adam-epsilon",
        type=float,
        default=COMMONGEN_RECIPE["merge_adam_epsilon"],
        help="AdamW's epsilon for the Merge training (default: the demo's; 1e-8, torch's, was the demo's before)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    if args.exclude_sets < args.train_sets:
        ap.error(f"--exclude-sets ({args.exclude_sets}) must be at least --train-sets ({args.train_sets})")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed, r = args.seed, COMMONGEN_RECIPE
    all_train, dev = load_split(args.data_dir, "train"), load_split(args.data_dir, "dev")
    # the demo's draw (random.sample's first k picks do not depend on how many more are asked for)
    train_sets = random.Random(seed + 1).sample(all_train, args.train_sets)
    sel = selection_split(
        all_train, {"seed": seed, "train_sets": args.exclude_sets}, args.selection_sets, 31, dev
    )
    assert not {tuple(c.concepts) for c in sel} & {tuple(c.concepts) for c in train_sets}
    model, tok = load_model("smollm2-135m-instruct")
    fmt, eot = PromptFormat(INSTRUCTION, True), end_of_turn_id(tok)

    def encode(sets):
        lines = [c.prompt for c in sets]
        ids = encode_prompts(tok, lines, prompt_format=fmt)
        return ids, {tuple(i): line for i, line in zip(ids, lines, strict=True)}

    ids, texts = encode(train_sets)
    top = "|".join(str(i) for i in range(24, 30))
    opts = dict(
        lora_r=8, lora_alpha=16, lora_target_modules=rf".*layers\.({top})\.(self_attn|mlp)\.[a-z]+_proj"
    )
    first = Guide.create(model, "dinado-merge", tokenizer=tok, seed=seed, **opts)
    clock = time.perf_counter()
    samples, caches = sample_with_features(
        model,
        [first],
        ids,
        args.samples_per_set,
        as_token_oracle(coverage_oracle(), tok, texts),
        max_new_tokens=r["max_new_tokens"],
        batch_size=100,
        seed=seed,
        tokenizer=tok,
        eos_token_id=eot,
    )
    labelled = relabel(samples, as_token_oracle(coverage_oracle(soft=True), tok, texts))
    record = {"args": vars(args), "positives": samples.positive_rate, "sample_s": time.perf_counter() - clock}
    gen = dict(max_new_tokens=r["max_new_tokens"], pad_token_id=tok.pad_token_id)
    prompts = [c.prompt for c in sel]
    base, _ = _sample_and_score({"base": model}, model, tok, prompts, coverage_oracle(), seed, fmt, {}, **gen)
    record.update(base=base["base"]["success"], adapters=[])
    if args.validation_sets:
        taken = {tuple(c.concepts) for c in train_sets + sel}
        pool = [c for c in all_train if tuple(c.concepts) not in taken]
        vids, vtexts = encode(random.Random(seed + 99).sample(pool, args.validation_sets))
        val = sample(
            model, vids, 4, as_token_oracle(coverage_oracle(), tok, vtexts), max_new_tokens=r["max_new_tokens"],
            batch_size=100, seed=seed + 7, tokenizer=tok, eos_token_id=eot,
        )  # fmt: skip
        shares = relabel(val, as_token_oracle(coverage_oracle(soft=True), tok, vtexts)).labels.float()

        def log_likelihoods(m) -> torch.Tensor:
            out = []
            for start in range(0, len(val), 16):  # 16 at a time: each row is [length, vocabulary]
                chunk = range(start, min(start + 16, len(val)))
                for i, lp in zip(chunk, completion_log_probs(m, val, chunk), strict=True):
                    out.append(float(lp.gather(1, torch.tensor(val.completions[i])[:, None]).sum()))
            return torch.tensor(out)

        # the base teacher-forced like the guided model (not val.token_log_p, recorded while generating): D is a
        # difference of two passes through the same code, so their rounding cancels
        base_ll = log_likelihoods(model)
        record["validation_mean_share"] = float(shares.mean())
    print(json.dumps({k: v for k, v in record.items() if k != "adapters"}), flush=True)
    for k in range(args.inits):
        clock = time.perf_counter()
        guide = first if k == 0 else Guide.create(
            model, "dinado-merge", seed=seed + k, tokenizer_fingerprint=first.config.tokenizer_fingerprint, **opts
        )  # fmt: skip
        _fit(
            guide, labelled, r["merge_steps"], r["merge_lr"], seed, caches[0], adam_epsilon=args.adam_epsilon
        )
        merged, check = _merge_checked(model, guide, labelled, r["merge_scale"], seed)
        row = {"init": seed + k, **check}
        if args.validation_sets:
            full = guide.merge(adapter_scale=r["merge_scale"])
            row["label_gap_12"] = label_gap(log_likelihoods(full) - base_ll, shares)
        res, _ = _sample_and_score(
            {"m": merged}, model, tok, prompts, coverage_oracle(), seed, fmt, {}, **gen
        )
        row.update({m: res["m"][m] for m in ("success", "coverage", "base_perplexity")})
        row["seconds"] = time.perf_counter() - clock
        record["adapters"].append(row)
        print(json.dumps(row), flush=True)
        atomic_write_text(Path(args.output), json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
