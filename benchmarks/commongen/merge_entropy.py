"""Does a DiNADO-Merge adapter concentrate probability or spread it? Entropy and KL by adapter scale.

    python benchmarks/commongen/merge_entropy.py --run runs/demo --scales 6,9,12,16

Teacher-forced on ``--samples`` of the run's own training samples (``samples.safetensors``: the base's
completions), the merged model ``Guide.merge(adapter_scale=s)`` and the base each give a next-token distribution
at every completion position; the table shows, per scale, the mean next-token entropy of the merged model, the
base's, and KL(q_s || p) and KL(p || q_s) per token. An adapter that helps lowers the entropy as it is scaled up
(q* ∝ p·C concentrates on fewer continuations); one that raises it moves probability into the tail, which at
T = 1 gives broken words (docs/demo.md, "What the failing seed's adapter does"). Needs no decoding and no oracle
call: one forward pass of the base and one per scale. Reads a ``dinado demo`` output (``summary.json``) or a
``run.py`` output (``results.json``) for the base's name; ``--base`` overrides it. Writes
``merge_entropy.json`` and ``merge_entropy.md`` to ``--output`` (default: the run directory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dinado import Guide, SampleSet
from dinado._utils import atomic_write_text
from dinado.evaluation import completion_log_probs, mean_entropy
from dinado.hf import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import logger, markdown_table  # noqa: E402

log = logger("merge_entropy", "stdout")


def profile(base_lp: list[torch.Tensor], merged_lp: list[torch.Tensor]) -> dict[str, float]:
    """Mean per-token entropy of the merged model and KL in both directions against the base (nats)."""
    q, p = torch.cat(merged_lp), torch.cat(base_lp)
    return {
        "entropy": mean_entropy(merged_lp),
        "kl_q_p": float((q.exp() * (q - p)).sum(-1).mean()),
        "kl_p_q": float((p.exp() * (p - q)).sum(-1).mean()),
    }


def base_name(run: Path) -> str:
    for name in ("summary.json", "results.json"):  # both record the base under "base"
        if (run / name).is_file():
            return json.loads((run / name).read_text())["base"]
    raise SystemExit(f"{run} has neither summary.json (dinado demo) nor results.json (run.py): pass --base")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", required=True, help="a dinado demo or run.py output (samples.safetensors, guides/)"
    )
    p.add_argument("--variant", default="dinado-merge", help="the run's merged guide (guides/<variant>)")
    p.add_argument("--base", default=None, help="the base's name or path (default: the run's own)")
    p.add_argument("--scales", default="6,9,12,16", help="adapter scales, comma-separated")
    p.add_argument("--samples", type=int, default=96, help="training samples to read (a seeded draw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--output", default=None, help="directory for merge_entropy.json / .md (default: --run)")
    args = p.parse_args(argv)
    scales = [float(x) for x in args.scales.split(",") if x.strip()]
    if not scales or any(s < 0 for s in scales):
        p.error(f"--scales must be non-negative numbers, got {args.scales!r}")
    if args.samples < 1:
        p.error(f"--samples must be at least 1, got {args.samples}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    samples = SampleSet.load(run / "samples.safetensors")
    model, tokenizer = load_model(args.base or base_name(run))
    model.eval().requires_grad_(False)
    guide = Guide.from_pretrained(run / "guides" / args.variant, model, tokenizer=tokenizer).eval()
    if guide.module is not None:
        raise SystemExit(f"{args.variant} is a module guide: this check is for merged (LoRA) guides")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(args.seed)).tolist()
    indices = order[: args.samples]
    base_lp = completion_log_probs(model, samples, indices, pad, args.batch_size)
    base_entropy = mean_entropy(base_lp)
    rows = []
    for scale in scales:
        merged = guide.merge(adapter_scale=scale).eval()
        row = {"scale": scale, **profile(base_lp, completion_log_probs(merged, samples, indices, pad))}
        row["spreads"] = row["entropy"] > base_entropy
        rows.append(row)
        log(
            f"scale {scale:g}: entropy {row['entropy']:.3f} (base {base_entropy:.3f}), KL {row['kl_q_p']:.3f}"
        )
    report = {
        "command": "python benchmarks/commongen/merge_entropy.py " + " ".join(argv or sys.argv[1:]),
        "run": str(run),
        "variant": args.variant,
        "samples": len(indices),
        "tokens": sum(len(samples.completions[i]) for i in indices),
        "base_entropy": base_entropy,
        "rows": rows,
    }
    table = markdown_table(
        ["scale", "entropy", "KL(q‖p)/token", "KL(p‖q)/token", "spreads"],
        [
            [
                f"{r['scale']:g}",
                f"{r['entropy']:.3f}",
                f"{r['kl_q_p']:.3f}",
                f"{r['kl_p_q']:.3f}",
                "yes" if r["spreads"] else "no",
            ]
            for r in rows
        ],
    )
    text = (
        f"{report['command']}\n\n{report['samples']} training samples ({report['tokens']} completion tokens); "
        f"base next-token entropy {base_entropy:.3f}\n\n{table}\n"
    )
    out_dir = Path(args.output or run)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "merge_entropy.json", json.dumps(report, indent=2))
    atomic_write_text(out_dir / "merge_entropy.md", text)
    print(text)
    return report


if __name__ == "__main__":
    main()
