"""What is in beam search's other beams: the oracle's ceiling and reranking by the guide's own value.

    python benchmarks/commongen/beams.py --run runs/m-1e-4 --sets 200 --scales 0,6

On the selection split of ``strength.py`` (train concept sets the run never trained on; ``--concept-mix dev`` by
default), each strength decodes with the run's beam width and keeps every final beam (``num_return_sequences`` =
the beam width, in beam-score order). Per strength it reports all-concepts success (and sentence success, word
lists and loops counted as failures) of:

- ``top beam``: the first beam, i.e. plain beam search;
- ``oracle over beams``: any beam that covers every concept (an upper bound for any reranker of these beams; it
  spends one oracle call per beam at test time, as best-of-N does);
- ``value rerank``: the beam with the highest terminal value R_theta(x) of the run's guide (``--variant``, read
  at its trained strength), which needs no oracle call: the guide's learned estimate of C for the whole output;
- ``value rerank, sentences``: the same among the beams that are neither word lists nor loops (the top beam when
  every beam is one).

Each pick (one beam per concept set) is scored like a row of the results file (``commongen_metrics``: coverage,
success, sentence success, BLEU-4, CIDEr, METEOR, ROUGE-L); the oracle's ceiling by success alone.

``--split dev`` decodes the first ``--sets`` dev concept sets instead (0: all 992), to measure on the split the
targets are stated on; nothing is chosen from it.

Also the ROC AUC of R_theta(x) against the all-concepts label over every beam, which says how well the guide's
terminal values sort outputs of that strength. Writes ``beams.json`` and ``beams.md`` to ``--output`` (default:
``<run>/beams``).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from dinado import Guide
from dinado._utils import atomic_write_text
from dinado.data import pad_prompts
from dinado.tasks.commongen import commongen_metrics, coverage_oracle, is_loop, is_word_list, load_split
from dinado.text import candidate_log_values, encode_prompts, end_of_turn_id

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diagnose import auc  # noqa: E402
from strength import selection_split  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import logger, markdown_table  # noqa: E402
from benchmarks.commongen.run import open_run  # noqa: E402

log = logger("beams", "stdout")
# what each pick of one beam per concept set is scored by (commongen_metrics, the results file's metrics)
PICK_METRICS = ("success", "sentence_success", "coverage", "bleu4", "cider", "meteor", "rouge_l")


def decode_beams(model, tokenizer, prompt_ids, beams, max_new_tokens, eos, batch_size):
    """Every final beam of each prompt, best first: a list (per prompt) of ``beams`` completions (token ids,
    ending with ``eos`` unless the length cap cut them)."""
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        ids, mask = pad_prompts(prompt_ids[i : i + batch_size], tokenizer.pad_token_id, False)
        with torch.no_grad():
            seqs = model.generate(
                ids,
                attention_mask=mask,
                do_sample=False,
                num_beams=beams,
                num_return_sequences=beams,
                early_stopping=True,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        for r, row in enumerate(seqs[:, ids.shape[1] :].tolist()):
            completion = row[: row.index(eos) + 1] if eos in row else row
            if r % beams == 0:
                out.append([])
            out[-1].append(completion)
    return out


def beam_values(guide: Guide, prompt_ids, beams, batch_size: int) -> list[list[float]]:
    """R_theta(x) of every kept beam (the guide's value at the terminal prefix), grouped as ``beams`` is."""
    grouped = candidate_log_values(guide, prompt_ids, beams, batch_size)
    return [[math.exp(v) for v in group] for group in grouped]


def value_pick(values: list[float], sentences: list[bool] | None) -> int:
    """The beam with the highest value (the better-ranked beam on a tie); with ``sentences``, among the beams
    marked True, or among all of them when none is."""
    keep = [j for j, ok in enumerate(sentences) if ok] if sentences is not None else []
    return max(keep or range(len(values)), key=lambda j: (values[j], -j))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run.py output directory (guides/<variant>, results.json)")
    p.add_argument("--variant", default="dinado-merge", help="the guide whose strength and values are used")
    p.add_argument("--sets", type=int, default=200, help="selection concept sets")
    p.add_argument("--seed", type=int, default=31, help="seed of the selection split (strength.py's default)")
    p.add_argument("--concept-mix", choices=("train", "dev"), default="dev")
    p.add_argument(
        "--split",
        choices=("selection", "dev"),
        default="selection",
        help="the selection split (default), or the first --sets dev concept sets (0: all) to measure, not choose",
    )
    p.add_argument("--scales", default="0,6", help="strengths, comma-separated (0 = the base)")
    p.add_argument(
        "--batch-size", type=int, default=64, help="strength.py's default, so its top beams are these"
    )
    p.add_argument(
        "--value-batch-size",
        type=int,
        default=16,
        help="beams per guide forward when reading values (full-vocabulary tensors: at 64 on dev the process reached 10 GB)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None, help="directory for beams.json / .md (default: <run>/beams)")
    args = p.parse_args(argv)
    scales = [float(x) for x in args.scales.split(",") if x.strip()]
    if not scales or any(s < 0 for s in scales):
        p.error(f"--scales must be non-negative numbers, got {args.scales!r}")
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    results, model, tokenizer, fmt = open_run(run)
    run_args = results["args"]
    guide = Guide.from_pretrained(run / "guides" / args.variant, model, tokenizer=tokenizer).eval()
    if guide.module is not None and any(s > 0 for s in scales):
        raise SystemExit(
            f"beams.py decodes merged guides at an adapter scale; {args.variant} is a module variant (alpha), "
            "which guided decoding does not return every beam of: use --variant dinado-merge, or --scales 0"
        )
    if args.split == "dev":
        dev = load_split(run_args["data_dir"], "dev")
        sets = dev[: args.sets] if args.sets > 0 else dev
    else:
        like = load_split(run_args["data_dir"], "dev") if args.concept_mix == "dev" else None
        sets = selection_split(
            load_split(run_args["data_dir"], "train"), run_args, args.sets, args.seed, like
        )
    lines = [s.prompt for s in sets]
    prompt_ids = encode_prompts(tokenizer, lines, prompt_format=fmt)
    eos = end_of_turn_id(tokenizer) if fmt.chat else tokenizer.eos_token_id
    width = run_args["beams"]
    oracle = coverage_oracle()
    log(f"{len(sets)} {args.split} sets, beam {width} (every beam kept), strengths {scales}")
    rows, n = [], len(sets)
    for scale in scales:
        if scale == 0:
            source = model
        else:
            source = guide.merge(adapter_scale=scale)
        beams = decode_beams(
            source, tokenizer, prompt_ids, width, run_args["max_new_tokens"], eos, args.batch_size
        )
        texts = [[tokenizer.decode(c, skip_special_tokens=True).strip() for c in group] for group in beams]
        by_set = beam_values(guide, prompt_ids, beams, args.value_batch_size)
        covered = [
            [all(row) for row in oracle.coverage([lines[i]] * len(texts[i]), texts[i])] for i in range(n)
        ]
        sentence = [[not (is_word_list(t) or is_loop(t)) for t in group] for group in texts]
        picks = {
            "top beam": [0] * n,
            "value rerank": [value_pick(by_set[i], None) for i in range(n)],
            "value rerank, sentences": [value_pick(by_set[i], sentence[i]) for i in range(n)],
        }
        row = {"strength": scale}
        for name, chosen in picks.items():
            metrics = commongen_metrics(sets, [texts[i][j] for i, j in enumerate(chosen)])
            row[name] = {key: metrics[key] for key in PICK_METRICS} | {
                "changed": sum(j != 0 for j in chosen) / n
            }
        row["oracle over beams"] = {
            "success": sum(any(c) for c in covered) / n,
            "sentence_success": sum(
                any(c and s for c, s in zip(covered[i], sentence[i], strict=True)) for i in range(n)
            )
            / n,
        }
        labels = [float(c) for group in covered for c in group]
        values = [v for group in by_set for v in group]
        row["auc_value_vs_label"] = auc(values, labels)
        row["mean_value"] = sum(values) / len(values)
        rows.append(row)
        log(
            f"strength {scale:g}: top beam {row['top beam']['success']:.3f}, value rerank "
            f"{row['value rerank']['success']:.3f} (changed {row['value rerank']['changed']:.3f}), sentences "
            f"{row['value rerank, sentences']['sentence_success']:.3f}, oracle over beams "
            f"{row['oracle over beams']['success']:.3f}, AUC {row['auc_value_vs_label']}"
        )
    report = {
        "command": shlex.join(["python", "benchmarks/commongen/beams.py", *(argv or sys.argv[1:])]),
        "run": str(run),
        "variant": args.variant,
        "beams": width,
        "split": args.split,
        "sets": n,
        "concept_mix": args.concept_mix if args.split == "selection" else None,
        "rows": rows,
    }
    header = ["strength", "pick", "success", "sentence success", "BLEU-4", "CIDEr", "changed from top beam"]
    table_rows = []
    for r in rows:
        for name in ("top beam", "value rerank", "value rerank, sentences", "oracle over beams"):
            c = r[name]
            # the oracle's pick is an upper bound on success only: no texts, so no n-gram metrics
            extra = [f"{c[k]:.3f}" if k in c else "–" for k in ("bleu4", "cider", "changed")]
            table_rows.append(
                [f"{r['strength']:g}", name, f"{c['success']:.3f}", f"{c['sentence_success']:.3f}", *extra]
            )
    table = markdown_table(header, table_rows)
    aucs = ", ".join(
        f"{r['strength']:g}: {r['auc_value_vs_label']:.3f}" if r["auc_value_vs_label"] is not None else "n/a"
        for r in rows
    )
    out_dir = Path(args.output or run / "beams")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "beams.json", json.dumps(report, indent=2))
    atomic_write_text(
        out_dir / "beams.md", f"{report['command']}\n\n{table}\n\nAUC of R_theta(x) vs all-concepts: {aucs}\n"
    )
    print(table)
    return report


if __name__ == "__main__":
    main()
