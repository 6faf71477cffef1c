"""Decoding cost of the guide module's pointer: DiNADO-Soft with and without it, beside plain generate().

    python benchmarks/pointer_cost.py --reps 5

GPT-2-small-shaped random base (12 layers, width 768, vocabulary 50,257), batch 8, 16-token prompts, 64 new
tokens forced, sampling; every configuration warmed up once, then run round-robin; medians reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import dinado


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)).eval()
    prompts = torch.randint(0, 50257, (8, 16))
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True, top_k=0,
                  pad_token_id=0)  # fmt: skip
    systems = {
        "plain generate": lambda: base.generate(prompts, attention_mask=torch.ones_like(prompts), **kwargs),
    }
    for pointer in (False, True):
        guide = dinado.Guide.create(base, "dinado-soft", pointer=pointer).eval()
        systems[f"dinado-soft, pointer {'on' if pointer else 'off'}"] = lambda g=guide: dinado.generate(
            g, prompts, torch.ones_like(prompts), **kwargs
        )
    times: dict[str, list[float]] = {name: [] for name in systems}
    names = list(systems)
    with torch.no_grad():
        for name in names:
            systems[name]()  # warm-up
        for rep in range(args.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                start = time.perf_counter()
                systems[name]()
                times[name].append(time.perf_counter() - start)
    base_median = statistics.median(times["plain generate"])
    print(
        f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}, {args.reps} repetitions"
    )
    print("| system | median s | × plain generate |\n|---|---|---|")
    for name in names:
        m = statistics.median(times[name])
        print(f"| {name} | {m:.2f} | {m / base_median:.2f} |")


if __name__ == "__main__":
    main()
