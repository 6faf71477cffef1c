"""The subcommands other than `train` (train.py), each a thin layer over the Python API; COMMANDS names them all."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

from .._utils import atomic_write_text
from ..demo import run_commongen_demo, run_toy_demo
from ..evaluation import evaluate_texts, markdown_report, plot_training_curves
from ..guide import Guide, check_candidates
from ..hf import is_encoder_decoder
from ..pretrain import PretrainConfig, pretrain
from ..sampling import sample
from ..text import encode_prompts, end_of_turn_id, generate_texts
from .errors import CLIError, interrupted
from .inputs import (
    build_oracle,
    check_prompt_lengths,
    load_base,
    load_guide,
    prompt_format,
    read_generations,
    read_jsonl,
    read_prompt_lines,
    require,
    text_oracle,
)
from .runs import Run, check_output, fresh_run, nothing_written
from .train import cmd_train


# ---------------------------------------------------------------------- sample
def cmd_sample(config: dict[str, Any]) -> None:
    """Sample completions from a base (or a guide as proposal) and label them with an oracle."""
    require(config, "output", "base", "prompts")
    prompts, lines = read_prompt_lines(config["prompts"])
    check_output(Path(config["output"]), config["overwrite"])
    model, tokenizer = load_base(config)
    fmt = prompt_format(config, tokenizer, model)
    rows = encode_prompts(tokenizer, prompts, is_encoder_decoder(model), fmt)
    oracle = build_oracle(config, tokenizer, {tuple(r): p for r, p in zip(rows, prompts, strict=True)})
    source = load_guide(config, model, tokenizer) if config.get("guide") else model
    check_prompt_lengths(model, rows, config["max_new_tokens"], config["prompts"], lines)
    with fresh_run(config) as run:
        run.write_config(config)
        start = time.perf_counter()
        samples = sample(
            source,
            rows,
            config["num_samples"],
            oracle,
            config["max_new_tokens"],
            **{key: config[key] for key in ("temperature", "top_p", "batch_size", "seed")},
            eos_token_id=end_of_turn_id(tokenizer) if fmt.chat else None,
            tokenizer=tokenizer,
            progress=True,
        )
        samples.save(run.path / "samples.safetensors")
        run.log(
            {
                "samples": len(samples),
                "mean_label": samples.positive_rate,
                "positives": int((samples.labels > 0).sum()),
                "seconds": time.perf_counter() - start,
            }
        )
    _print_summary(samples, run.final / "samples.safetensors")


def _print_summary(samples, file: Path) -> None:
    print(f"wrote {len(samples):,} samples to {file}: {_sample_summary(samples)}")
    if not bool((samples.labels > 0).any()):
        print("warning: no sample satisfied the oracle; a guide cannot be trained on these samples alone")


def _sample_summary(samples) -> str:
    n = len(samples)
    labels = samples.labels
    satisfied = int((labels >= 0.5).sum())
    text = f"{satisfied:,} of {n:,} samples ({satisfied / n:.1%}) satisfy the oracle"
    soft = bool(((labels > 0) & (labels < 1)).any())
    return text + (f" (labels are soft: mean label {float(labels.mean()):.3f})" if soft else "")


# ---------------------------------------------------------------------- generate
def cmd_generate(config: dict[str, Any]) -> None:
    """Decode prompts with the base alone or with a guide (greedy, sampling or beam search)."""
    require(config, "output", "base", "prompts")
    prompts, lines = read_prompt_lines(config["prompts"])
    copies = config["num_return_sequences"]
    if copies > 1 and not config["do_sample"]:
        raise CLIError(
            f"--num-return-sequences {copies} needs --do-sample true: greedy and beam search give the same "
            "output every time"
        )
    _check_rerank(config)
    check_output(Path(config["output"]), config["overwrite"])
    model, tokenizer = load_base(config)
    guide = _decoding_guide(config, model, tokenizer)
    source = _decoding_source(config, model, guide)
    fmt = prompt_format(config, tokenizer, model)
    rows = encode_prompts(tokenizer, prompts, is_encoder_decoder(model), fmt)
    check_prompt_lengths(model, rows, config["max_new_tokens"], config["prompts"], lines)
    with fresh_run(config) as run:
        run.write_config(config)
        torch.manual_seed(config["seed"])
        expanded = [p for p in prompts for _ in range(copies)]  # each prompt's samples side by side
        outputs, new_tokens, seconds = generate_texts(
            source,
            tokenizer,
            expanded,
            config["batch_size"],
            config["alpha"],
            prompt_format=fmt,
            rerank=guide if config["rerank_by_value"] else None,
            **_generation_options(config, tokenizer),
        )
        _write_generations(run.path / "generations.jsonl", expanded, outputs, copies)
        run.log(
            {
                "prompts": len(prompts),
                "outputs": len(outputs),
                "new_tokens": new_tokens,
                "seconds": seconds,
                "tokens_per_second": new_tokens / max(seconds, 1e-9),
            }
        )
    print(f"wrote {len(outputs)} generations to {run.final / 'generations.jsonl'}")


def _decoding_guide(config: dict[str, Any], model, tokenizer) -> Guide | None:
    """The --guide to decode with (None: the base alone), checked against --candidates."""
    guide = load_guide(config, model, tokenizer) if config.get("guide") else None
    if config["candidates"] is not None and (guide is None or guide.module is None):
        raise CLIError(
            "--candidates restricts a guide module's head to the top-k tokens: it needs --guide with a "
            "DiNADO-Hard or DiNADO-Soft guide (a merged or Merge guide already decodes at the base's cost)"
        )
    if config["candidates"] is not None:
        try:
            check_candidates(guide, config["candidates"])
        except ValueError as err:
            raise CLIError(f"--candidates: {err}") from None
    return guide


def _check_rerank(config: dict[str, Any]) -> None:
    """--rerank-by-value reads the values of beam search's final beams from --guide: it needs both."""
    if not config["rerank_by_value"]:
        return
    if not config.get("guide"):
        raise CLIError(
            "--rerank-by-value ranks the final beams by a guide's value R_theta(x): give the guide with --guide"
        )
    if config["num_beams"] < 2 or config["do_sample"]:
        raise CLIError(
            f"--rerank-by-value picks one of beam search's final beams: it needs --num-beams 2 or more and no "
            f"--do-sample (got --num-beams {config['num_beams']}), e.g. --num-beams 4"
        )


def _decoding_source(config: dict[str, Any], model, guide: Guide | None):
    """What decodes: the base, the guide, or (--adapter-scale other than 1) a Merge guide folded in at that scale."""
    scale = config["adapter_scale"]
    if math.isclose(scale, 1.0):
        return guide if guide is not None else model
    if guide is None or guide.module is not None:
        raise CLIError(
            f"--adapter-scale {scale:g} folds a DiNADO-Merge adapter in at another strength: it needs --guide with "
            "a dinado-merge guide (a module guide's strength is --alpha)"
        )
    if not math.isclose(config["alpha"], 1.0):
        raise CLIError(
            "--alpha and --adapter-scale are two strengths for the same guide: give one (--adapter-scale for a "
            "dinado-merge guide)"
        )
    return guide.merge(adapter_scale=scale)


def _write_generations(file: Path, prompts: list[str], outputs: list[str], copies: int) -> None:
    """One JSON line per output: its prompt, its completion and (with several per prompt) which sample it is."""
    records = [
        {"prompt": p, "completion": c.strip(), **({"sample": i % copies} if copies > 1 else {})}
        for i, (p, c) in enumerate(zip(prompts, outputs, strict=True))
    ]
    atomic_write_text(file, "".join(json.dumps(r) + "\n" for r in records))


def _generation_options(config: dict[str, Any], tokenizer) -> dict[str, Any]:
    """generate()'s keyword arguments for --do-sample, --num-beams, --temperature, --top-p, --candidates and
    --no-repeat-ngram-size."""
    options = dict(
        max_new_tokens=config["max_new_tokens"],
        do_sample=config["do_sample"],
        num_beams=config["num_beams"],
        pad_token_id=tokenizer.pad_token_id,
    )
    if config["do_sample"]:
        options.update(top_k=0, temperature=config["temperature"], top_p=config["top_p"])
    if config["candidates"] is not None:
        options["candidates"] = config["candidates"]
    if config["no_repeat_ngram_size"] is not None:
        options["no_repeat_ngram_size"] = config["no_repeat_ngram_size"]
    return options


# ---------------------------------------------------------------------- merge
def cmd_merge(config: dict[str, Any]) -> None:
    """Fold a DiNADO-Merge guide's LoRA into the base: a plain model at the base's cost."""
    require(config, "output", "base", "guide")
    check_output(Path(config["output"]), config["overwrite"])
    model, tokenizer = load_base(config)
    guide = load_guide(config, model, tokenizer)
    try:
        merged = guide.merge(adapter_scale=config["adapter_scale"])
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    with fresh_run(config) as run:
        merged.save_pretrained(run.path)
        tokenizer.save_pretrained(run.path)
        run.write_config(config)
    print(
        f"wrote the merged model to {run.final}: use it as `--base {run.final}` "
        "(or AutoModelForCausalLM.from_pretrained), at the base's cost"
    )


# ---------------------------------------------------------------------- evaluate
def cmd_evaluate(config: dict[str, Any]) -> None:
    """Score generations: oracle success, coverage, BLEU, base perplexity, distinct-n; write a report."""
    require(config, "output", "generations")
    runs = _read_runs(config)
    decoding = _decoding_config(config)  # the prompt format the generations were made with
    oracle = text_oracle(decoding | {k: config[k] for k in ("oracle", "keywords")})
    references = _read_references(config, len(runs["guide"][0]))
    curves = None
    if config.get("train_run"):
        curves = Path(config["train_run"]) / "metrics.jsonl"
        if not curves.is_file():
            raise CLIError(f"training metrics {curves} not found (give a `dinado train` run directory)")
    check_output(Path(config["output"]), config["overwrite"])
    model = tokenizer = fmt = None
    if config.get("base"):
        model, tokenizer = load_base(config)
        fmt = prompt_format(decoding, tokenizer, model)
    with fresh_run(config) as run:
        run.write_config(config)
        score = partial(
            evaluate_texts,
            oracle=oracle,
            references=references,
            model=model,
            tokenizer=tokenizer,
            prompt_format=fmt,
        )
        results = {name: _score(run, name, rows, records, score) for name, (rows, records) in runs.items()}
        atomic_write_text(run.path / "metrics.json", json.dumps(results, indent=2))
        if curves is not None:
            plot_training_curves(read_jsonl(curves), run.path / "training_curves.png")
        atomic_write_text(run.path / "report.md", markdown_report(results, _examples(runs), list(runs)))
    for name, values in results.items():
        print(name, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
    print(f"wrote {run.final / 'report.md'}")


def _read_runs(config: dict[str, Any]) -> dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]:
    """--generations as "guide", after --compare as "base" when given: (rows, metrics records) each."""
    runs = {"guide": read_generations(config["generations"])}
    if config.get("compare"):
        runs = {"base": read_generations(config["compare"]), **runs}
        if [r["prompt"] for r in runs["base"][0]] != [r["prompt"] for r in runs["guide"][0]]:
            raise CLIError(
                "--compare must hold generations for the same prompts in the same order (and the same "
                "--num-return-sequences): generate both from the same prompts file"
            )
    return runs


def _decoding_config(config: dict[str, Any]) -> dict[str, Any]:
    """--prompt-template and --chat for evaluate: as given, else as the --generations run recorded them."""
    p = Path(config["generations"])
    recorded = (p if p.is_dir() else p.parent) / "config.yaml"
    saved = yaml.safe_load(recorded.read_text(encoding="utf-8")) if recorded.is_file() else {}
    saved = saved if isinstance(saved, dict) else {}
    return {
        key: config[key] if config.get(key) is not None else saved.get(key, default)
        for key, default in (("prompt_template", None), ("chat", "auto"))
    }


def _read_references(config: dict[str, Any], generations: int) -> list[list[str]] | None:
    if not config.get("references"):
        return None
    ref_file = Path(config["references"])
    if not ref_file.is_file():
        raise CLIError(f"references file {ref_file} not found: give one line of references per prompt")
    references = [line.split(" ||| ") for line in ref_file.read_text(encoding="utf-8").splitlines()]
    if len(references) != generations:
        raise CLIError(
            f"{ref_file} has {len(references)} lines for {generations} generations: give one line per generation"
        )
    return references


def _score(run: Run, name: str, rows, records, score: Callable[..., dict[str, float]]) -> dict[str, float]:
    """One system's metrics: ``score(prompts, completions)``, and the tokens/s its generate run recorded."""
    result = score([r["prompt"] for r in rows], [r["completion"] for r in rows])
    speed = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
    if speed:
        result["tokens_per_second"] = speed[-1]
    run.log({"system": name, **result})
    return result


def _examples(runs) -> list[dict[str, str]]:
    """One row per prompt (the first 20): each system's completion of it."""
    names = list(runs)
    return [
        {
            "prompt": same[0]["prompt"],
            **{name: row["completion"] for name, row in zip(names, same, strict=True)},
        }
        for same in zip(*(rows for rows, _ in runs.values()), strict=True)
    ][:20]


# ---------------------------------------------------------------------- pretrain and demo
def cmd_pretrain(config: dict[str, Any]) -> None:
    """Train a byte-level BPE tokenizer and a small base (GPT-2, or Marian with --architecture marian) on a text file or pairs."""
    require(config, "output")
    fields = {k: v for k, v in config.items() if k not in ("output", "overwrite")}
    try:
        pretrain_config = PretrainConfig.from_dict(fields)
        pretrain_config.validate()
    except TypeError as exc:
        raise CLIError(str(exc)) from None
    output = Path(config["output"])
    check_output(output, config["overwrite"])
    try:
        result = pretrain(pretrain_config, output, overwrite=config["overwrite"])
    except KeyboardInterrupt as exc:
        raise interrupted(exc, nothing_written(output)) from None
    atomic_write_text(output / "config.yaml", yaml.safe_dump(config, sort_keys=True))
    print(  # pretrain() itself prints why it stopped (`pretrain stopped: max_epochs=3 reached ...`)
        f"pretrained {result.num_parameters:,} parameters for {result.steps} steps "
        f"(best held-out loss {result.best_val_loss:.3f} at step {result.best_step}); saved to {output}"
    )


def cmd_demo(config: dict[str, Any]) -> None:
    """The demo: SmolLM2 on CommonGen concept sets (or the toy language), DiNADO guides, one table."""
    output = config["output"] or "runs/demo"
    try:
        if config["task"] == "toy":
            run_toy_demo(output, config["seed"], config["quick"], config["threads"] or 1)
        elif config["task"] == "commongen":
            require(config, "data_dir")
            run_commongen_demo(
                output, config["data_dir"], config["base"], config["seed"], config["threads"], config["quick"]
            )
        else:
            raise CLIError(f"--task must be commongen or toy, got {config['task']!r}")
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt as exc:
        raise interrupted(
            exc,
            f"{config['output']} keeps what was finished (a completed base is reused); run the command again",
        ) from None


COMMANDS = {
    "pretrain": cmd_pretrain,
    "demo": cmd_demo,
    "sample": cmd_sample,
    "train": cmd_train,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "evaluate": cmd_evaluate,
}
