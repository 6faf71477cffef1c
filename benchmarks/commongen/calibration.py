"""Value calibration at intermediate prefixes: does a guide's R_theta(prefix) match E[C | prefix] under p?

    python benchmarks/commongen/calibration.py --run /tmp/cg/run --sets 40 --rollouts 8

For concept sets of dev that no guide saw, samples are drawn from the base p; at prefix depths d (completion
tokens so far) the true value R*(prefix) = E_p[C | prefix] is estimated by ``--rollouts`` continuations from p of
that prefix, each judged by the coverage oracle with the prefix included. C is what the run's guides were trained
on: the all-concepts label (``run.py --labels all``) or the covered share, to ``--label-power`` (``--labels
soft``), so that a soft-label guide is not scored against a target it never learned. Each guide of the run
(``<run>/guides/<variant>``, as run.py saves them) gives R_theta(prefix) from one forward pass. Reported per
variant and depth: mean absolute error |R_theta - R*_hat|, the ROC AUC of R_theta against the sample's own final
all-concepts label, the mean of each; and a calibration PNG (R*_hat against binned R_theta). R*_hat has the
Monte-Carlo error of ``--rollouts`` draws (a standard error of at most 0.5 / sqrt(k)).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from dinado import Guide, sample
from dinado._utils import atomic_write_text
from dinado.data import SampleSet, pad_prompts
from dinado.evaluation import save_figure
from dinado.hf import eval_mode
from dinado.objectives import prefix_log_values
from dinado.oracles import as_token_oracle
from dinado.tasks.commongen import coverage_oracle, load_split
from dinado.text import encode_prompts, end_of_turn_id

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose import auc  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import logger  # noqa: E402
from benchmarks.commongen.run import open_run  # noqa: E402

log = logger("calibration")


ALL_COVERED = 1.0 - 1e-9  # a covered share at or above this is "every concept covered"


@torch.no_grad()
def rollout_values(model, tokenizer, rows, oracle, k, max_new_tokens, eos, seed, batch_size=64):
    """The oracle's k labels for each (prompt ids + prefix ids) row, one per continuation from p, the oracle
    reading the prefix and the continuation together (R*_hat is their mean, or the mean of a function of them)."""
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    expanded = [(i, r) for i, r in enumerate(rows) for _ in range(k)]
    hits: list[list[float]] = [[] for _ in rows]
    with eval_mode(model):
        for start in range(0, len(expanded), batch_size):
            chunk = expanded[start : start + batch_size]
            ids, mask = pad_prompts([r[1][0] + r[1][1] for r in chunk], pad, False)
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
            )  # fmt: skip
            completions = []
            for (_, (_, prefix)), new in zip(chunk, out[:, ids.shape[1] :].tolist(), strict=True):
                if eos in new:
                    new = new[: new.index(eos) + 1]
                completions.append(prefix + new)
            labels = oracle([c[1][0] for c in chunk], completions)
            for (i, _), y in zip(chunk, labels, strict=True):
                hits[i].append(float(y))
    return hits


def training_target(run_args: dict):
    """The function of the covered share that the run's guides were trained to predict: the all-concepts label
    (``--labels all``) or the share to ``--label-power`` (``--labels soft``), with its name. A run trained with
    ``--sentences-only`` or ``--finished-only`` is refused: its target also reads whether the completion is a
    word list / ends its sentence, which the rollouts' covered share does not."""
    for flag, what in (("sentences_only", "word lists"), ("finished_only", "unfinished completions")):
        if run_args.get(flag):
            raise SystemExit(
                "calibration scores values against the covered share of rollouts; this run's guides were trained "
                f"with --{flag.replace('_', '-')} ({what} labelled 0), a target the rollouts do not measure"
            )
    if run_args.get("labels", "all") == "soft":
        power = float(run_args.get("label_power", 1.0))
        return (lambda share: share**power), ("covered share" if power == 1.0 else f"covered share^{power:g}")
    return (lambda share: float(share >= ALL_COVERED)), "all concepts covered"


@torch.no_grad()
def guide_prefix_values(guide: Guide, samples: SampleSet, picks: list[tuple[int, int]]) -> list[float]:
    """R_theta(prefix) for each (sample index, depth d >= 1): the value of the prefix holding d completion tokens.
    One forward pass per sample reads every depth picked from it."""
    by_sample: dict[int, list[int]] = {}
    for j, (index, _) in enumerate(picks):
        by_sample.setdefault(index, []).append(j)
    out = [0.0] * len(picks)
    with eval_mode(guide):
        for index, rows in by_sample.items():
            batch = samples.collate([index])
            raw = guide(batch.input_ids, batch.attention_mask)
            log_values, _ = guide.parameterization.log_values(
                raw.log_p, raw.direction, raw.norm, batch.input_ids, batch.completion_mask
            )
            log_r = prefix_log_values(log_values, batch.input_ids)[0]
            for j in rows:
                out[j] = float(log_r[len(samples.prompts[index]) + picks[j][1] - 2].exp())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run.py output directory (guides/<variant>, results.json)")
    p.add_argument("--sets", type=int, default=40, help="dev concept sets")
    p.add_argument("--samples-per-set", type=int, default=2)
    p.add_argument("--depths", default="1,4,8,16", help="completion tokens in the prefix")
    p.add_argument("--rollouts", type=int, default=8, help="continuations from p per prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--output", default=None, help="directory for calibration.json / .md / .png (default: --run)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run = Path(args.run)
    results, model, tokenizer, fmt = open_run(run)
    run_args = results["args"]
    out_dir = Path(args.output or run)
    eos = end_of_turn_id(tokenizer) if fmt.chat else tokenizer.eos_token_id
    dev = load_split(run_args["data_dir"], "dev")
    lines = [s.prompt for s in random.Random(args.seed + 21).sample(dev, min(args.sets, len(dev)))]
    ids = encode_prompts(tokenizer, lines, prompt_format=fmt)
    # one soft oracle (the covered share) serves both targets: the guides' own (their training labels) and the
    # all-concepts label (share 1) that the AUC is computed against
    oracle = as_token_oracle(
        coverage_oracle(soft=True), tokenizer, {tuple(i): line for i, line in zip(ids, lines, strict=True)}
    )
    target, target_name = training_target(run_args)
    max_new = run_args["max_new_tokens"]
    log(f"{len(lines)} dev concept sets x {args.samples_per_set} samples from p")
    samples = sample(
        model,
        ids,
        args.samples_per_set,
        oracle,
        max_new,
        seed=args.seed + 22,
        tokenizer=tokenizer,
        eos_token_id=eos,
    )
    depths = sorted(int(d) for d in args.depths.split(","))
    picks = [(i, d) for i in range(len(samples)) for d in depths if d < len(samples.completions[i])]
    rows = [(list(samples.prompts[i]), list(samples.completions[i][:d])) for i, d in picks]
    log(f"{len(picks)} prefixes x {args.rollouts} rollouts")
    shares = rollout_values(model, tokenizer, rows, oracle, args.rollouts, max_new, eos, args.seed + 23)
    truth = [sum(target(x) for x in row) / len(row) for row in shares]
    log(f"R* is the expected {target_name} (what the run's guides were trained on)")
    all_covered, _ = training_target({"labels": "all"})
    final = [all_covered(float(samples.labels[i])) for i, _ in picks]
    table: dict[str, dict] = {}
    values: dict[str, list[float]] = {}
    for path in sorted((run / "guides").iterdir()):
        guide = Guide.from_pretrained(path, model).eval()  # a guide never changes the model it wraps
        values[path.name] = guide_prefix_values(guide, samples, picks)
        log(f"{path.name}: values computed")
    values["constant base rate"] = [sum(truth) / len(truth)] * len(truth)  # a reference that knows nothing
    for name, r in values.items():
        table[name] = {}
        for d in depths:
            idx = [j for j, (_, depth) in enumerate(picks) if depth == d]
            if not idx:
                continue
            table[name][d] = {
                "prefixes": len(idx),
                "mae": sum(abs(r[j] - truth[j]) for j in idx) / len(idx),
                "auc_final_label": auc([r[j] for j in idx], [final[j] for j in idx]),
                "mean_r_theta": sum(r[j] for j in idx) / len(idx),
                "mean_r_star": sum(truth[j] for j in idx) / len(idx),
            }
    report = {
        "args": vars(args),
        "run": str(run),
        "target": target_name,
        "table": table,
        "prefixes": len(picks),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "calibration.json", json.dumps(report, indent=1, default=str))
    lines_md = [
        "| guide | depth | prefixes | mean R_theta | mean R*_hat | MAE | AUC vs final label |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_depth in table.items():
        for d, c in by_depth.items():
            a = "n/a" if c["auc_final_label"] is None else f"{c['auc_final_label']:.3f}"
            lines_md.append(
                f"| {name} | {d} | {c['prefixes']} | {c['mean_r_theta']:.3f} | {c['mean_r_star']:.3f} | {c['mae']:.3f} | {a} |"
            )
    markdown = f"R* = the expected {target_name} under p; AUC against the all-concepts label\n\n"
    markdown += "\n".join(lines_md) + "\n"
    atomic_write_text(out_dir / "calibration.md", markdown)
    plot(values, truth, out_dir / "calibration.png")
    print(markdown)
    return report


def plot(values: dict[str, list[float]], truth: list[float], path: Path, bins: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1)
    for name, r in values.items():
        if name.startswith("constant"):
            continue
        xs, ys = [], []
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            idx = [j for j, v in enumerate(r) if lo <= v < hi or (b == bins - 1 and v == 1.0)]
            if idx:
                xs.append(sum(r[j] for j in idx) / len(idx))
                ys.append(sum(truth[j] for j in idx) / len(idx))
        ax.plot(xs, ys, "-o", label=name)
    ax.set_xlabel("guide's R_theta(prefix) (binned)")
    ax.set_ylabel("rollout estimate of R*(prefix)")
    ax.set_title("value calibration at intermediate prefixes")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
