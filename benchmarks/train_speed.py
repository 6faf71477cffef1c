"""Training speed and memory of every variant: the base run at every step against cached base features.

Three paths, on the same batch of random token rows and the same guide options:

- ``before``: the loss as computed before the feature cache, from the full [B, L, V] values
  (``dinado.objectives.full_vocabulary_loss``), the base run at every step;
- ``uncached``: ``dinado.train(..., cache_features=False)``: the base run at every step, the loss from position
  statistics (one log-normaliser over the vocabulary per position);
- ``cached``: ``dinado.train(..., cache_features=cache)`` with ``cache = dinado.features.precompute_features(...)``
  computed first (its time is reported apart: it is paid once per sample set, not per step).

DiNADO-Merge trains a LoRA adapter inside the base: its ``cached`` path keeps what the lowest adapted decoder layer
reads and runs only the layers from there up (``--merge-options '{"lora_target_modules": ...}'`` adapts the top
layers only; with the default, every layer, only the LM head's rows are saved).

Every (variant, path) runs in its own subprocess, so that its peak memory is its own: the table gives the peak
resident memory of the training steps (``VmHWM`` after resetting it through ``/proc/self/clear_refs`` once the
model, guide and cache are built; ``ru_maxrss`` of the whole subprocess where that is not possible) and, on a GPU,
``torch.cuda.max_memory_allocated``. Seconds per step are the median of the timed steps (each a full optimizer
step: collate, loss, backward, AdamW) after warm-up steps. The sample set holds exactly one batch, so every step
sees the same rows.

``--base`` takes any causal LM: a hub id, a local directory, a ``.gguf`` file (``--gguf-file`` for one inside
a directory) or a named offline base (``smollm2-135m-instruct``); it is loaded in float32. ``--quick`` builds a
tiny random Llama instead (2 layers, width 64, SmolLM2's vocabulary of 49,152) and runs 2 timed steps at batch 8.

Markdown goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks.common
from benchmarks.common import logger, markdown_table  # noqa: E402

log = logger()

MODULE_VARIANTS = ("nado", "dinado-soft", "dinado-hard")
VARIANTS = (*MODULE_VARIANTS, "dinado-merge")
PATHS = ("before", "uncached", "cached")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="hub id, local directory, .gguf file or named base (not with --quick)")
    parser.add_argument("--gguf-file", help="a GGUF file inside the --base directory or hub repository")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny random Llama (vocabulary 49,152), in about a minute"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="rows per step (default 32; --quick 8)")
    parser.add_argument(
        "--prompt-length", type=int, default=None, help="prompt tokens per row (default 16; --quick 8)"
    )
    parser.add_argument(
        "--completion-length",
        type=int,
        default=None,
        help="the longest completion (default 32; --quick 16); lengths vary from half of it to all of it",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per configuration (default 3; --quick 2)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--guide-layers", type=int, default=2, help="layers of the guide module (default 2)")
    parser.add_argument(
        "--merge-options",
        type=json.loads,
        default={},
        help='JSON Guide.create options for dinado-merge, e.g. {"lora_target_modules": ".*layers\\.2[4-9]\\..*_proj"}',
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    args = parser.parse_args(argv)
    if args.child is None and (args.base is None) == (not args.quick):
        parser.error("give --base or --quick (not both)")
    preset = {"batch_size": 8, "prompt_length": 8, "completion_length": 16, "steps": 2} if args.quick else {}
    defaults = {"batch_size": 32, "prompt_length": 16, "completion_length": 32, "steps": 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, value))
    return args


# ------------------------------------------------------------------------------------------------- the child
def _load_base(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if spec["base"] is None:  # --quick: SmolLM2's vocabulary on a tiny random Llama
        torch.manual_seed(spec["seed"])
        config = LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
        )
        return LlamaForCausalLM(config).eval()
    weights = Path(spec["base"]) / "weights.safetensors"
    if weights.is_file():  # a dequantised GGUF base, saved by the parent
        from safetensors.torch import load_model
        from transformers import AutoConfig

        model = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(spec["base"]), dtype=torch.float32
        )
        load_model(model, str(weights))
        return model.eval()
    kwargs = {"dtype": torch.float32}
    if spec["gguf_file"]:
        kwargs["gguf_file"] = spec["gguf_file"]
    return AutoModelForCausalLM.from_pretrained(spec["base"], **kwargs).eval()


def _samples(spec: dict, vocab: int, eos: int):
    import torch

    from dinado import SampleSet

    g = torch.Generator().manual_seed(spec["seed"])
    n, longest = spec["batch_size"], spec["completion_length"]
    low = max(1, longest // 2)

    def tokens(count: int) -> list[int]:
        ids = torch.randint(3, vocab, (count,), generator=g)
        ids[ids == eos] = 3
        return ids.tolist()

    prompts = [tokens(spec["prompt_length"]) for _ in range(n)]
    lengths = torch.randint(low, longest + 1, (n,), generator=g).tolist()
    completions = [tokens(k - 1) + [eos] for k in lengths]
    labels = torch.randint(0, 2, (n,), generator=g).float().tolist()
    return SampleSet.from_token_ids(prompts, completions, labels)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        return True
    except OSError:
        return False


def _peak_rss_mib(reset_worked: bool) -> float:
    if reset_worked:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_child(spec: dict) -> dict:
    import torch

    import dinado
    from dinado import features, objectives, training

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    base = _load_base(spec)
    eos = base.generation_config.eos_token_id
    eos = int(eos[0] if isinstance(eos, (list, tuple)) else eos if eos is not None else 0)
    samples = _samples(spec, base.config.vocab_size, eos)
    torch.manual_seed(spec["seed"])
    options = (
        spec["merge_options"] if spec["variant"] == "dinado-merge" else {"num_layers": spec["guide_layers"]}
    )
    guide = dinado.Guide.create(base, spec["variant"], **options).to(device)
    path = spec["path"]
    result: dict = {"variant": spec["variant"], "path": path}
    cache = False
    if path == "cached":
        start = time.perf_counter()
        cache = features.precompute_features(guide, samples, batch_size=spec["batch_size"])
        result["precompute_s"] = time.perf_counter() - start
        result["cache_mib"] = cache.nbytes / 2**20
    elif path == "before":

        def before(guide, batch, normalizer=None):  # the loss as computed before the cache
            loss = objectives.full_vocabulary_loss(guide, batch)
            zero = loss.new_zeros(())
            return objectives.LossTerms(loss, loss.detach(), zero, 0, 0)

        training.guide_loss = before
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset = _reset_peak()
    stamps: list[float] = []
    total = spec["warmup"] + spec["steps"]
    start = time.perf_counter()
    report = dinado.train(
        guide,
        samples,
        max_steps=total,
        batch_size=spec["batch_size"],
        seed=spec["seed"],
        cache_features=cache,
        on_step=lambda step, values: stamps.append(time.perf_counter()),
    )
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)][spec["warmup"] :]
    result["step_s"] = statistics.median(times)
    result["step_s_all"] = times
    result["peak_rss_mib"] = _peak_rss_mib(reset)
    result["peak_rss_scope"] = "steps" if reset else "process"
    if device.type == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["loss_first"] = report.loss[0]
    result["cached_features"] = report.cached_features
    return result


# ------------------------------------------------------------------------------------------------ the parent


def _prepared_base(args: argparse.Namespace, workdir: Path) -> tuple[str | None, str | None, str]:
    """(base, gguf_file, description) for the children; a GGUF base is dequantised once and saved in float32,
    so that each child loads plain safetensors."""
    if args.quick:
        return None, None, "tiny random Llama (2 layers, width 64, vocabulary 49,152)"
    import torch
    from transformers import AutoModelForCausalLM

    source, gguf = args.base, args.gguf_file
    try:
        from dinado.bases import resolve_base

        source, gguf = resolve_base(args.base, args.gguf_file)
    except ImportError:
        if args.base.lower().endswith(".gguf"):
            source, gguf = str(Path(args.base).parent), Path(args.base).name
    if gguf is None:
        return source, None, args.base
    from safetensors.torch import save_model

    log(f"dequantising {gguf} to float32 once for the subprocesses ...")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    target = workdir / "base"
    target.mkdir()
    # transformers refuses save_pretrained on a GGUF-loaded model: keep the config and the float32 weights
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (target / "config.json").write_text(json.dumps(config))
    save_model(model, str(target / "weights.safetensors"))
    return str(target), None, f"{args.base} (GGUF {gguf}, dequantised to float32)"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        print("RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    import torch

    import dinado

    print(f"Command: `{shlex.join([sys.executable, *sys.argv])}`\n")
    with tempfile.TemporaryDirectory(prefix="dinado-train-speed-") as tmp:
        base, gguf, described = _prepared_base(args, Path(tmp))
        jobs = [(variant, path) for variant in args.variants for path in args.paths]
        results = []
        for variant, path in jobs:
            spec = {
                "base": base,
                "gguf_file": gguf,
                "variant": variant,
                "path": path,
                **{
                    k: getattr(args, k) for k in ("batch_size", "prompt_length", "completion_length", "steps")
                },
                **{
                    k: getattr(args, k)
                    for k in ("warmup", "guide_layers", "merge_options", "threads", "device", "seed")
                },
            }
            log(f"{variant} [{path}] ...")
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
            )
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                log(proc.stderr[-4000:])
                raise SystemExit(f"{variant} [{path}] failed (exit {proc.returncode})")
            result = json.loads(lines[-1][len("RESULT ") :])
            results.append(result)
            log(
                f"{variant} [{path}]: {result['step_s']:.2f} s/step, peak {result['peak_rss_mib']:.0f} MiB "
                f"({time.perf_counter() - started:.0f} s in all)"
            )

    print(
        f"dinado {dinado.__version__}, torch {torch.__version__}, torch threads {args.threads}, "
        f"{os.cpu_count()} CPUs ({platform.machine()}), device {args.device}; base: {described}; batch "
        f"{args.batch_size} rows x (prompt {args.prompt_length} + completion "
        f"{max(1, args.completion_length // 2)}–{args.completion_length}) tokens, guide {args.guide_layers} "
        f"layers; median of {args.steps} timed steps after {args.warmup} warm-up; seed {args.seed}\n"
    )
    by_key = {(r["variant"], r["path"]): r for r in results}
    cuda = args.device.startswith("cuda")
    header = [
        "variant",
        "path",
        "s / step",
        "× faster than before",
        "× faster than uncached",
        "peak RSS (MiB)",
    ]
    header += ["peak CUDA (MiB)"] if cuda else []
    header += ["cache build (s, once)", "cache size (MiB)"]
    rows = []
    for r in results:
        before = by_key.get((r["variant"], "before"))
        uncached = by_key.get((r["variant"], "uncached"))
        ratios = [
            f"{ref['step_s'] / r['step_s']:.1f}" if ref is not None else "–" for ref in (before, uncached)
        ]
        scope = "" if r["peak_rss_scope"] == "steps" else " (process)"
        row = [r["variant"], r["path"], f"{r['step_s']:.2f}", *ratios]
        row.append(f"{r['peak_rss_mib']:.0f}{scope}")
        if cuda:
            row.append(f"{r.get('peak_cuda_mib', 0):.0f}")
        row.append(f"{r['precompute_s']:.2f}" if "precompute_s" in r else "–")
        row.append(f"{r['cache_mib']:.1f}" if "cache_mib" in r else "–")
        rows.append(row)
    print("## Seconds per training step and peak memory\n")
    print(markdown_table(header, rows))
    print(
        "\nPeak RSS: the highest resident memory of the subprocess during the training steps (model, guide, "
        "optimizer and cache included, since they are resident then). First-step losses agree across paths: "
        + ", ".join(
            f"{v} {min(r['loss_first'] for r in results if r['variant'] == v):.5f}–"
            f"{max(r['loss_first'] for r in results if r['variant'] == v):.5f}"
            for v in args.variants
        )
    )


if __name__ == "__main__":
    main()
