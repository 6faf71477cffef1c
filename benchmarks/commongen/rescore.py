"""Score a run's decoded outputs again, on this machine: coverage, success and the caption metrics.

    python benchmarks/commongen/rescore.py --runs runs/gpu/dev-base runs/gpu/dev-dinado-merge-beam \
        --data-dir ../shared/data/commongen/v1.1_LHRYANG

For runs made where the caption metrics could not all be computed: METEOR needs Java (pycocoevalcap runs it as
a subprocess), which a GPU machine may not have, and ``caption_metrics`` then reports it as None. Each row of
``results.json`` names its outputs (``outputs_key`` in ``outputs.json``); the row's concept sets are rebuilt as
run.py drew them (the run's split sizes and seed) from ``--data-dir`` (default: the run's own), and every metric
that needs only the outputs and the references is computed again. The base perplexity of the outputs (which needs
the base model) is kept as the run measured it. ``results.json`` and ``results.md`` are rewritten in place
(atomically); ``--rows-json`` also writes the rows in the docs/results format, as run.py's option does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for benchmarks.common
from benchmarks.commongen.run import eval_sets, machine_rows, results_markdown  # noqa: E402
from dinado._utils import atomic_write_text  # noqa: E402
from dinado.tasks.commongen import commongen_metrics  # noqa: E402


def rescore(run: Path, data_dir: str | None = None) -> dict:
    """The run's results with every row scored again from its outputs (see the module docstring)."""
    results = json.loads((run / "results.json").read_text())
    outputs = json.loads((run / "outputs.json").read_text())
    args = results["args"]
    source = data_dir or args["data_dir"]
    splits: dict[str, list] = {}
    for row in results["rows"]:
        key = row.get("outputs_key")
        if key is None or key not in outputs:
            raise SystemExit(
                f"{run}: the row {row['split']} / {row['decoding']} / {row['system']} names no outputs in "
                "outputs.json (runs made before rows recorded their outputs_key cannot be scored again)"
            )
        split = row["split"]
        if split not in splits:
            splits[split] = eval_sets(source, split, args)
        sets, texts = splits[split], outputs[key]
        if len(texts) != len(sets):
            raise SystemExit(f"{run}: {key} holds {len(texts)} outputs for {len(sets)} {split} concept sets")
        row.update(commongen_metrics(sets, texts))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="run.py output directories")
    p.add_argument(
        "--data-dir", default=None, help="CommonGen files here (default: the path each run recorded)"
    )
    p.add_argument(
        "--rows-json", action="store_true", help="also write rows.json (docs/results format) per run"
    )
    args = p.parse_args(argv)
    for name in args.runs:
        run = Path(name)
        results = rescore(run, args.data_dir)
        atomic_write_text(run / "results.json", json.dumps(results, indent=2))
        atomic_write_text(run / "results.md", results_markdown(results))
        if args.rows_json:
            rows = machine_rows(results["rows"], results["args"])
            atomic_write_text(run / "rows.json", json.dumps(rows, indent=1) + "\n")
        print(f"{run}: {len(results['rows'])} rows scored again", flush=True)


if __name__ == "__main__":
    main()
