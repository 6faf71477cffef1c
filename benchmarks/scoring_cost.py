"""Cost of scoring outputs under the base (``dinado.evaluation.base_perplexity``): the LM head run only at the
completions' positions (``logits_to_keep``, what the library does) against at every position (the same function
on a view of the model that does not take ``logits_to_keep``), side by side.

The workload is CommonGen-shaped: ``--sets`` dev concept sets from ``--data-dir``, the instruction in the chat
template's user turn (the prompt as ``dinado demo`` and ``run.py`` give it), each set's first reference as the
completion (the same length as a guide's outputs, ~12 words; no generation needed). Each repetition runs both
ways in a rotated order; the median is reported, with the two perplexities (they must agree).

    python benchmarks/scoring_cost.py --data-dir ../shared/data/commongen/v1.1_LHRYANG --reps 3
"""

from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.common
from benchmarks.common import logger, markdown_table  # noqa: E402
from dinado.evaluation import base_perplexity  # noqa: E402
from dinado.hf import load_model  # noqa: E402
from dinado.tasks.commongen import INSTRUCTION, load_split  # noqa: E402
from dinado.text import PromptFormat  # noqa: E402

log = logger("scoring")


class AllPositions(nn.Module):
    """The model, seen without ``logits_to_keep``: every position's logits, as before the change."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", required=True, help="CommonGen files ({split}_src.txt/_trg.txt)")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--sets", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.base)
    chat = getattr(tokenizer, "chat_template", None) is not None
    fmt = PromptFormat(INSTRUCTION if chat else "{prompt}", chat)
    sets = load_split(args.data_dir, "dev")[: args.sets]
    prompts, outputs = [c.prompt for c in sets], [c.references[0] for c in sets]
    ways = {"LM head at completion positions": model, "LM head at every position": AllPositions(model).eval()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    values: dict[str, float] = {}
    names = list(ways)
    for rep in range(args.reps + 1):  # the first round warms up
        for name in names[rep % 2 :] + names[: rep % 2]:
            start = time.perf_counter()
            values[name] = base_perplexity(ways[name], tokenizer, prompts, outputs, prompt_format=fmt)
            if rep:
                times[name].append(time.perf_counter() - start)
        log(f"round {rep}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items() if rep))
    a, b = values.values()
    if not math.isclose(a, b, rel_tol=1e-4):
        raise SystemExit(f"the two ways disagree: perplexity {a} against {b}")
    full = statistics.median(times["LM head at every position"])
    rows = [
        [name, f"{statistics.median(t):.2f}", f"{full / statistics.median(t):.2f}x", f"{values[name]:.3f}"]
        for name, t in times.items()
    ]
    print(f"\n`python benchmarks/scoring_cost.py {shlex.join(argv if argv is not None else sys.argv[1:])}`")
    print(
        f"{args.base}, {len(prompts)} CommonGen dev prompts + references, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n"
    )
    print(markdown_table(["base perplexity", "seconds (median)", "speed-up", "perplexity"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
