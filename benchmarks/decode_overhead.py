"""Decoding cost of a guide: tokens/s of plain ``generate`` against guided generation, per variant and head.

The default base is a randomly initialised GPT-2-small-sized model (12 layers, width 768, vocabulary 50257), so
no download is needed; speed does not depend on the weights. ``--base smollm2-135m-instruct`` (or any name or
path ``dinado.load_model`` takes) times a real model instead. Each module variant (NADO, DiNADO-Hard, -Soft)
decodes through ``dinado.generate`` (the base plus the guide's own layers and vocabulary head, one cached
step per token). DiNADO-Soft is also timed with each head of ``--heads`` (``GuideConfig.head`` and
``head_rank``: ``full``, ``tied``, ``full:R``, ``tied:R``). DiNADO-Merge is timed twice: the merged model's own ``generate`` (the deployment path) and
the unmerged LoRA adapter through ``dinado.generate``. The guides are untrained (zero-initialised heads):
that changes nothing about their cost.

Generation is forced to the full length (``min_new_tokens = max_new_tokens``) so that EOS never stops a
run early. The machine may be shared: every configuration is warmed up once, then each repetition runs
all of them round-robin (in a rotated order), and the median over repetitions is reported.

Markdown tables go to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

import dinado

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.common
from benchmarks.common import logger, markdown_table  # noqa: E402

log = logger()

MODES = ("sample", "beam")
MODULE_VARIANTS = ("nado", "dinado-hard", "dinado-soft")
RANDOM_BASE = "gpt2-small-random"


def parse_head(spec: str) -> dict:
    """``full`` / ``tied``, optionally ``:R`` (rank R, or ``none`` for full rank; without it the default
    ``head_rank="auto"``) and ``/W`` (module width W) -> Guide.create options."""
    spec, _, width = spec.partition("/")
    head, sep, rank = spec.partition(":")
    if (
        head not in ("full", "tied")
        or (sep and not (rank.isdigit() or rank == "none"))
        or (width and not width.isdigit())
    ):
        raise argparse.ArgumentTypeError(
            f"a head is full or tied, optionally :RANK (or :none) and /WIDTH (the module's width), got {spec!r}"
        )
    options: dict = {"head": head}
    if sep:
        options["head_rank"] = None if rank == "none" else int(rank)
    if width:
        options["module_dim"] = int(width)
    return options


@dataclass
class Config:
    """One way of decoding: a name and a function (input_ids, attention_mask, generate kwargs) -> ids."""

    name: str
    run: Callable[..., torch.Tensor]
    timings: dict[str, list[float]] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--reps", type=int, default=None, help="timed repetitions per configuration (default 3)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    parser.add_argument("--prompt-length", type=int, default=16, help="tokens per random prompt (default 16)")
    parser.add_argument(
        "--new-tokens", type=int, default=None, help="tokens generated per prompt (default 64)"
    )
    parser.add_argument("--num-beams", type=int, default=4, help="beams in beam-search mode (default 4)")
    parser.add_argument("--guide-layers", type=int, default=2, help="layers of the guide module (default 2)")
    parser.add_argument("--base-layers", type=int, default=None, help="layers of the base model (default 12)")
    parser.add_argument(
        "--base",
        default=RANDOM_BASE,
        help=f"{RANDOM_BASE} (default: GPT-2 small's shape, random weights) or a model name or path, "
        "e.g. smollm2-135m-instruct",
    )
    parser.add_argument(
        "--heads",
        nargs="*",
        default=[parse_head(spec) for spec in ("tied:none", "tied:64", "full:none")],
        type=parse_head,
        help="extra DiNADO-Soft heads to time beside the default (full, tied; :R rank R or :none full rank; /W width W)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(MODULE_VARIANTS),
        choices=MODULE_VARIANTS,
        help="module variants to time with the default head (all three cost the same within noise)",
    )
    parser.add_argument(
        "--candidates",
        nargs="*",
        type=int,
        default=[64],
        help="also time the default DiNADO-Soft guide with candidate-restricted guidance (top-k of p)",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and sampling")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--quick", action="store_true", help="a fast smoke test: 2 base layers, 8 new tokens, 1 repetition"
    )
    args = parser.parse_args(argv)
    preset = {"reps": 1, "new_tokens": 8, "base_layers": 2} if args.quick else {}
    defaults = {"reps": 3, "new_tokens": 64, "base_layers": 12}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, value))
    return args


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights, such as GPT-2's embedding and output head, count once)."""
    return sum(p.numel() for p in model.parameters())


def build_base(args: argparse.Namespace) -> PreTrainedModel:
    if args.base != RANDOM_BASE:
        from dinado.hf import load_model

        return load_model(args.base)[0].eval()
    torch.manual_seed(args.seed)
    config = GPT2Config(n_layer=args.base_layers, n_embd=768, n_head=12, vocab_size=50257)
    return GPT2LMHeadModel(config).eval()


def build_guide(
    base: PreTrainedModel, variant: str, args: argparse.Namespace, **options: object
) -> dinado.Guide:
    """A guide over the base; dinado-merge wraps its base with PEFT in place, so it gets its own copy."""
    torch.manual_seed(args.seed)
    model = copy.deepcopy(base) if variant == "dinado-merge" else base
    return dinado.Guide.create(model, variant, num_layers=args.guide_layers, **options)


def head_label(options: dict) -> str:
    rank, width = options.get("head_rank", "auto"), options.get("module_dim")
    rank_label = {"auto": "", None: " full-rank"}.get(rank, f" rank {rank}")
    return options["head"] + rank_label + (f", width {width}" if width else "")


def mode_kwargs(mode: str, args: argparse.Namespace, eos: int) -> dict:
    common = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }
    if mode == "sample":
        return {**common, "do_sample": True, "top_k": 0}
    return {**common, "do_sample": False, "num_beams": args.num_beams}


def timed_call(
    config: Config, mode: str, ids: torch.Tensor, mask: torch.Tensor, kwargs: dict, seed: int
) -> float:
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = config.run(ids, mask, kwargs)
    seconds = time.perf_counter() - start
    expected = (ids.shape[0], ids.shape[1] + kwargs["max_new_tokens"])
    if tuple(out.shape) != expected:
        raise RuntimeError(f"{config.name} ({mode}) returned shape {tuple(out.shape)}, expected {expected}")
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"Command: `{shlex.join([sys.executable, *sys.argv])}`\n")
    print(
        f"dinado {dinado.__version__}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), CUDA {'yes' if torch.cuda.is_available() else 'no'}; "
        f"batch {args.batch_size} x prompt {args.prompt_length} tokens, {args.new_tokens} new tokens, "
        f"{args.reps} reps, seed {args.seed}\n"
    )

    base = build_base(args)
    eos = base.generation_config.eos_token_id
    eos = int(eos[0] if isinstance(eos, list) else eos if eos is not None else base.config.eos_token_id)
    vocab = base.get_output_embeddings().weight.shape[0]
    print(f"Base: {args.base} ({type(base).__name__}, vocabulary {vocab:,})\n")
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch_size, args.prompt_length), generator=generator)
    ids[ids == eos] = (eos + 1) % vocab  # no EOS inside the prompts
    mask = torch.ones_like(ids)

    variants = sorted(set(args.variants) | {"dinado-soft"}, key=MODULE_VARIANTS.index)
    guides = {variant: build_guide(base, variant, args) for variant in (*variants, "dinado-merge")}
    default = guides["dinado-soft"].config
    default_head = head_label({"head": default.head, "head_rank": default.head_rank})
    extra_heads = {
        f"dinado-soft, {head_label(h)} head": build_guide(base, "dinado-soft", args, **h)
        for h in args.heads
        if head_label(h) != default_head
    }
    merged = guides["dinado-merge"].merge()
    base_params = count_parameters(base)
    merged_params = count_parameters(merged)
    assert merged_params == base_params, f"merged model has {merged_params} parameters, base {base_params}"

    def guided(guide: dinado.Guide, **options: object) -> Callable[..., torch.Tensor]:
        return lambda i, m, kw: dinado.generate(guide, i, m, **options, **kw)

    def plain(model: PreTrainedModel) -> Callable[..., torch.Tensor]:
        return lambda i, m, kw: model.generate(input_ids=i, attention_mask=m, **kw)

    configs = [Config("base (plain generate)", plain(base))]
    configs += [Config(f"{v} (dinado.generate)", guided(guides[v])) for v in variants]
    configs += [Config(f"{name} (dinado.generate)", guided(guide)) for name, guide in extra_heads.items()]
    configs += [
        Config(
            f"dinado-soft, top-{k} candidates (dinado.generate)", guided(guides["dinado-soft"], candidates=k)
        )
        for k in args.candidates
    ]
    configs.append(Config("dinado-merge, merged (plain generate)", plain(merged)))
    configs.append(Config("dinado-merge, unmerged adapter (dinado.generate)", guided(guides["dinado-merge"])))

    param_rows = [["base (plain generate)", "0", f"{base_params:,}"]]
    module_guides = {f"{v}, {default_head} head": guides[v] for v in variants} | extra_heads
    for name, guide in module_guides.items():
        own = sum(p.numel() for p in guide.trainable_state().values())
        param_rows.append([name, f"{own:,}", f"{base_params + own:,}"])
    lora = sum(p.numel() for p in guides["dinado-merge"].trainable_state().values())
    param_rows.append(["dinado-merge, merged", f"{lora:,} (before merging)", f"{merged_params:,}"])
    param_rows.append(
        ["dinado-merge, unmerged adapter", f"{lora:,}", f"{count_parameters(guides['dinado-merge']):,}"]
    )

    kwargs = {mode: mode_kwargs(mode, args, eos) for mode in args.modes}
    with torch.inference_mode():
        for config in configs:
            for mode in args.modes:
                seconds = timed_call(config, mode, ids, mask, kwargs[mode], args.seed)
                log(f"warm-up {config.name} [{mode}]: {seconds:.2f} s")
        jobs = [(config, mode) for mode in args.modes for config in configs]
        for rep in range(args.reps):
            shift = rep % len(jobs)
            for config, mode in jobs[shift:] + jobs[:shift]:
                seconds = timed_call(config, mode, ids, mask, kwargs[mode], args.seed + 1 + rep)
                config.timings.setdefault(mode, []).append(seconds)
                log(f"rep {rep + 1} {config.name} [{mode}]: {seconds:.2f} s")

    tokens = args.batch_size * args.new_tokens

    def speed(config: Config, mode: str) -> float:
        return tokens / statistics.median(config.timings[mode])

    header = ["configuration"]
    for mode in args.modes:
        label = "sampling" if mode == "sample" else f"beam search ({args.num_beams} beams)"
        header += [f"{label}: tokens/s (min–max)", f"{label}: × base"]
    rows = []
    for config in configs:
        row = [config.name]
        for mode in args.modes:
            each = [tokens / s for s in config.timings[mode]]
            row.append(f"{speed(config, mode):.1f} ({min(each):.1f}–{max(each):.1f})")
            row.append(f"{speed(config, mode) / speed(configs[0], mode):.2f}")
        rows.append(row)
    print("## Decoding speed (median over repetitions; × base = tokens/s relative to plain generate)\n")
    print(markdown_table(header, rows))
    print(
        f"\nTokens/s counts the {args.batch_size} x {args.new_tokens} returned new tokens "
        "(beam search also computes the other beams)."
    )
    print("\n## Parameters\n")
    print(
        markdown_table(["configuration", "trainable guide parameters", "base + guide parameters"], param_rows)
    )
    print(f"\nMerged model parameters == base parameters: {merged_params:,} == {base_params:,} (asserted)")


if __name__ == "__main__":
    main()
