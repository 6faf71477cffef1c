"""Join the result rows of several run.py runs into one file, and the markdown table generated from that file.

    python benchmarks/commongen/combine.py --runs runs/dev-sample runs/dev-beam runs/test-sample runs/test-beam \
        --json docs/results/commongen_smollm2.json --markdown docs/results/commongen_smollm2.md
    python benchmarks/commongen/combine.py --json docs/results/commongen_smollm2.json      # the table only
    python benchmarks/commongen/combine.py --json docs/results/commongen_smollm2.json --add --runs runs/new \
        [--replace]          # add a later run's rows to the file (its earlier runs need not exist any more)
    python benchmarks/commongen/combine.py --runs runs/merge runs/modules --curves-only \
        --curves docs/results/commongen_smollm2_curves.png   # every guide's training curves in one PNG

A full run on a 2-core machine is split across processes (one per split and decoding, each with its own
``--merge-scale`` or ``--alpha`` chosen by strength.py); this puts their rows together in the format of
docs/results/commongen_smollm2.json. Runs must share the base and the guides' training samples; a row (split,
decoding, system) may come from one run only. The file is a list of rows, each with the number of concept sets
it was scored on (``sets``) and the command that produced it (``command``). The markdown table is always
generated from the JSON file, so the two never disagree; the commands are listed under it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dinado._utils import atomic_write_text

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.common import markdown_table  # noqa: E402
from benchmarks.commongen.run import (  # noqa: E402
    BASELINES,
    VARIANTS,
    machine_rows,
    plot_training_curves,
)

SPLIT_ORDER = ("dev", "test")
DECODING_ORDER = ("greedy", "beam", "sample")
SYSTEM_ORDER = ("base", *VARIANTS, *BASELINES)


def _order(row: dict) -> tuple:
    system = row["system"]
    rank = SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)
    best_of = int(system.split("-")[-1]) if system.startswith("best-of-") else 0
    decoding = next((i for i, d in enumerate(DECODING_ORDER) if row["decoding"].startswith(d)), 99)
    split = SPLIT_ORDER.index(row["split"]) if row["split"] in SPLIT_ORDER else 99
    return (split, decoding, rank, best_of)


def combine(runs: list[Path]) -> list[dict]:
    """Every run's rows in the docs/results format, checked and ordered."""
    rows, origin = [], {}
    reference = None
    for run in runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: pass run.py output directories to --runs")
        results = json.loads(path.read_text())
        key = (results["base"], results["train_sets"], results["samples"], results["args"]["seed"])
        if reference is None:
            reference = (key, run)
        elif key != reference[0]:
            raise SystemExit(
                f"{run} has another base or training sample set (base, train sets, samples, seed) {key} than "
                f"{reference[1]} {reference[0]}: its rows do not belong in the same table"
            )
        for row in machine_rows(results["rows"], results["args"]):
            cell = (row["split"], row["decoding"], row["system"])
            if cell in origin:
                raise SystemExit(
                    f"{cell} comes from both {origin[cell]} and {run}: decode each row in one run only "
                    "(run.py --no-base / --best-of '' / --splits / --decodings)"
                )
            origin[cell] = run
            row["sets"] = results["split_sizes"][row["split"]]
            row["command"] = results["command"]
            rows.append(row)
    return sorted(rows, key=_order)


def add_rows(existing: list[dict], new: list[dict], replace: bool) -> list[dict]:
    """``existing`` rows with ``new`` ones added, ordered; a (split, decoding, system) cell already in
    ``existing`` is an error unless ``replace``, which drops the old row for the new one."""
    cells = {(r["split"], r["decoding"], r["system"]) for r in new}
    clash = sorted(c for c in cells if c in {(r["split"], r["decoding"], r["system"]) for r in existing})
    if clash and not replace:
        raise SystemExit(
            f"{clash} are already in the file: pass --replace to put the new runs' rows in their place"
        )
    kept = [r for r in existing if (r["split"], r["decoding"], r["system"]) not in cells]
    return sorted(kept + new, key=_order)


def training_curves(runs: list[Path]) -> dict:
    """Each guide's per-step training record (``train`` of results.json) from the run that trained it."""
    curves, origin = {}, {}
    for run in runs:
        results = json.loads((Path(run) / "results.json").read_text())
        for name, info in results.get("train", {}).items():
            if "cross_entropy" not in info:
                continue
            if name in curves:
                raise SystemExit(f"{name} was trained in both {origin[name]} and {run}: pass one of them")
            curves[name], origin[name] = info, run
    if not curves:
        raise SystemExit(f"none of {[str(r) for r in runs]} recorded training curves (results.json 'train')")
    return curves


def curve_summary(curves: dict) -> str:
    """First and last cross-entropy and the regulariser's largest and last value of each guide."""
    body = [
        [
            name,
            str(len(info["cross_entropy"])),
            f"{info['cross_entropy'][0]:.3f}",
            f"{info['cross_entropy'][-1]:.3f}",
            f"{max(info['regularizer']):.3f}",
            f"{info['regularizer'][-1]:.3f}",
        ]
        for name, info in curves.items()
    ]
    header = ["guide", "steps", "CE first", "CE last", "regulariser max", "regulariser last"]
    return markdown_table(header, body)


def table(rows: list[dict]) -> str:
    """The markdown table of rows in the docs/results format ("sentence success": success counting word lists and
    repetition loops as failures, "–" for rows scored before it was measured)."""

    def f(value, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    header = ["split (sets)", "decoding", "system", "strength", "success", "sentence success", "coverage"]
    header += ["BLEU-4", "CIDEr"]
    header += ["METEOR", "ROUGE-L", "SPICE", "words", "base ppl", "oracle calls (train / test)"]
    body = [
        [
            f"{r['split']} ({r['sets']:,})" if "sets" in r else r["split"],
            r["decoding"],
            r["system"],
            "–"
            if r.get("strength") is None
            else f"{r['strength']:g}" + ("" if r.get("candidates") is None else f", top-{r['candidates']}"),
            f(r["success"]),
            f(r["sentence_success"]) if "sentence_success" in r and "loops" in r else "–",
            f(r["coverage"]),
            f(r["bleu4"]),
            f(r["cider"]),
            f(r["meteor"]),
            f(r["rougeL"]),
            "n/a",
            f(r["words"], 1),
            f(r.get("base_ppl"), 1),
            f"{r['oracle_calls_train']:,} / {r['oracle_calls_test']:,}",
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="*", default=[], help="run.py output directories to join")
    p.add_argument("--json", default=None, help="rows file: written from --runs, else read")
    p.add_argument("--markdown", default=None, help="also write the table (and the commands) here")
    p.add_argument(
        "--curves", default=None, help="also plot every guide's training curves of --runs here (PNG)"
    )
    p.add_argument(
        "--curves-only", action="store_true", help="only the curves (runs whose rows are not for --json)"
    )
    p.add_argument("--add", action="store_true", help="add the --runs' rows to the existing --json file")
    p.add_argument(
        "--replace", action="store_true", help="with --add: new rows replace rows of the same cell"
    )
    args = p.parse_args(argv)
    if args.replace and not args.add:
        p.error("--replace goes with --add")
    if args.add and not (args.runs and args.json and Path(args.json).is_file()):
        p.error("--add needs --runs and an existing --json file")
    if args.curves_only and not (args.curves and args.runs):
        p.error("--curves-only needs --curves and --runs")
    if args.json is None and not args.curves_only:
        p.error("--json is required (or --curves-only with --curves and --runs)")
    if args.curves:
        curves = training_curves([Path(r) for r in args.runs])
        plot_training_curves(curves, Path(args.curves))
        summary = curve_summary(curves)
        print(summary)
        if args.curves_only:
            return summary
    if args.runs:
        rows = combine([Path(r) for r in args.runs])
        if args.add:
            rows = add_rows(json.loads(Path(args.json).read_text()), rows, args.replace)
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    else:
        path = Path(args.json)
        if not path.is_file():
            raise SystemExit(f"{path} does not exist: pass --runs to build it")
        rows = json.loads(path.read_text())
    text = table(rows)
    commands = list(dict.fromkeys(r["command"] for r in rows if r.get("command")))
    if commands:
        text += "\n\nCommands:\n\n```bash\n" + "\n".join(commands) + "\n```"
    if args.markdown:
        atomic_write_text(args.markdown, text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
