"""Cost of two steps every CommonGen run repeats, each timed two ways side by side in one run.

- ``score``: the base perplexity of outputs (``dinado.evaluation.base_perplexity``) with the LM head run only at
  the completions' positions (``logits_to_keep``, what the library does) against at every position (the same
  function on a view of the model that does not take ``logits_to_keep``). The workload: ``--sets`` dev concept
  sets from ``--data-dir`` in the chat template (the prompt as ``dinado demo`` and ``run.py`` give it), each
  set's first reference as the completion (a guide's output length, no generation needed).
- ``sample``: ``dinado.sample`` of ``--per-set`` completions for each of ``--sample-sets`` train concept sets,
  the prompt run once per distinct prompt (``share_prefill=True``, the default) against once per row; with the
  count of completions that came out the same (the same distribution; float rounding moves a few late draws).

Each repetition runs both ways in a rotated order after a warm-up round; medians are reported.

    python benchmarks/sample_and_score_cost.py --data-dir ../shared/data/commongen/v1.1_LHRYANG --reps 2
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.common
from benchmarks.common import logger, markdown_table  # noqa: E402
from dinado.evaluation import base_perplexity  # noqa: E402
from dinado.hf import load_model  # noqa: E402
from dinado.oracles import as_token_oracle  # noqa: E402
from dinado.sampling import sample  # noqa: E402
from dinado.tasks.commongen import INSTRUCTION, coverage_oracle, load_split  # noqa: E402
from dinado.text import PromptFormat, encode_prompts, end_of_turn_id  # noqa: E402

log = logger("cost")


class AllPositions(nn.Module):
    """The model, seen without ``logits_to_keep``: every position's logits, as before the change."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def side_by_side(ways: dict[str, Callable[[], Any]], reps: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Run each way once to warm up, then ``reps`` rounds in a rotated order: (median seconds, last result) by
    way."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    results: dict[str, Any] = {}
    names = list(ways)
    for rep in range(reps + 1):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            results[name] = ways[name]()
            if rep:
                times[name].append(time.perf_counter() - start)
        if rep:
            log(f"round {rep}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
    return {name: statistics.median(t) for name, t in times.items()}, results


def speed_rows(seconds: dict[str, float], reference: str, extra: dict[str, str]) -> list[list[str]]:
    return [[name, f"{t:.2f}", f"{seconds[reference] / t:.2f}x", extra[name]] for name, t in seconds.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", required=True, help="CommonGen files ({split}_src.txt/_trg.txt)")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--what", choices=("score", "sample", "both"), default="both")
    parser.add_argument("--sets", type=int, default=100, help="dev concept sets scored (default 100)")
    parser.add_argument("--sample-sets", type=int, default=50, help="train concept sets sampled (default 50)")
    parser.add_argument("--per-set", type=int, default=4, help="completions per sampled set (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.base)
    chat = getattr(tokenizer, "chat_template", None) is not None
    fmt = PromptFormat(INSTRUCTION if chat else "{prompt}", chat)
    print(
        f"\n`python benchmarks/sample_and_score_cost.py {shlex.join(argv if argv is not None else sys.argv[1:])}`"
    )
    print(
        f"{args.base}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}"
    )
    if args.what in ("score", "both"):
        sets = load_split(args.data_dir, "dev")[: args.sets]
        prompts, outputs = [c.prompt for c in sets], [c.references[0] for c in sets]
        views = {
            "LM head at completion positions": model,
            "LM head at every position": AllPositions(model).eval(),
        }
        seconds, values = side_by_side(
            {
                name: (lambda m=m: base_perplexity(m, tokenizer, prompts, outputs, prompt_format=fmt))
                for name, m in views.items()
            },
            args.reps,
        )
        a, b = values.values()
        if not math.isclose(a, b, rel_tol=1e-4):
            raise SystemExit(f"the two ways disagree: perplexity {a} against {b}")
        print(f"\nBase perplexity of {len(prompts)} CommonGen dev references after their prompts\n")
        rows = speed_rows(seconds, "LM head at every position", {n: f"{v:.3f}" for n, v in values.items()})
        print(markdown_table(["scoring", "seconds (median)", "speed-up", "perplexity"], rows))
    if args.what in ("sample", "both"):
        sets = load_split(args.data_dir, "train")[: args.sample_sets]
        lines = [c.prompt for c in sets]
        ids = encode_prompts(tokenizer, lines, prompt_format=fmt)
        oracle = as_token_oracle(
            coverage_oracle(), tokenizer, {tuple(i): t for i, t in zip(ids, lines, strict=True)}
        )
        eos = end_of_turn_id(tokenizer) if chat else None
        kwargs = dict(max_new_tokens=args.max_new_tokens, batch_size=100, seed=0, eos_token_id=eos)
        seconds, drawn = side_by_side(
            {
                name: (
                    lambda share=share: sample(
                        model, ids, args.per_set, oracle, share_prefill=share, **kwargs
                    )
                )
                for name, share in (("one prefill per distinct prompt", True), ("one prefill per row", False))
            },
            args.reps,
        )
        shared, plain = drawn.values()
        same = sum(a == b for a, b in zip(shared.completions, plain.completions, strict=True))
        print(
            f"\nSampling {args.per_set} completions for each of {len(lines)} CommonGen train concept sets\n"
        )
        rows = speed_rows(seconds, "one prefill per row", {n: f"{same} of {len(plain)}" for n in seconds})
        print(markdown_table(["sampling", "seconds (median)", "speed-up", "completions alike"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
