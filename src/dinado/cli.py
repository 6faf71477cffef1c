"""The `dinado` command: thin subcommands over the Python API, each reading a YAML config plus flags.

Every subcommand writes a run directory: the resolved config (config.yaml), a metrics JSONL and its outputs.
Bad input ends with one line on stderr naming the problem and exit code 2, and leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .io import atomic_write_text
from .oracles import OracleError

EXAMPLES = {
    "pretrain": "dinado pretrain --data-format text --text-file corpus.txt --output runs/base --n-layer 4",
    "demo": "dinado demo --output runs/demo",
    "sample": "dinado sample --base runs/base --prompts prompts.txt --keywords dog,frisbee --output runs/samples",
    "train": "dinado train --base runs/base --samples runs/samples --variant dinado-soft --output runs/guide",
    "generate": "dinado generate --base runs/base --guide runs/guide/guide --prompts prompts.txt --output runs/gen",
    "evaluate": "dinado evaluate --generations runs/gen --compare runs/gen-base --keywords dog --output runs/eval",
    "merge": "dinado merge --base runs/base --guide runs/guide-merge/guide --output runs/merged",
}

# The schema of each subcommand: key -> (default, type, help). Config files may hold only these keys.
Spec = dict[str, tuple[Any, Callable | None, str]]
_COMMON: Spec = {
    "output": (None, str, "the run directory to write (required)"),
    "seed": (0, int, "random seed"),
}
_MODEL: Spec = {
    "base": (None, str, "base model: a hub id or a local path (required)"),
    "tokenizer": (None, str, "tokenizer id or path (default: the base's)"),
}
_ORACLE: Spec = {
    "oracle": (None, None, "an oracle config (YAML/JSON mapping), see docs/oracles.md"),
    "keywords": (None, str, "shortcut for a keyword oracle: comma-separated keywords"),
}
_DECODE: Spec = {
    "prompts": (None, str, "a text file with one prompt per line (required)"),
    "max_new_tokens": (32, int, "tokens to generate per prompt"),
    "temperature": (1.0, float, "sampling temperature"),
    "top_p": (1.0, float, "nucleus sampling threshold"),
    "batch_size": (32, int, "prompts per batch"),
}
SPECS: dict[str, Spec] = {
    "sample": {
        **_COMMON,
        **_MODEL,
        **_DECODE,
        **_ORACLE,
        "guide": (None, str, "sample from this guide as a proposal (importance weights are recorded)"),
        "num_samples": (8, int, "completions per prompt"),
    },
    "train": {
        **_COMMON,
        **_MODEL,
        "samples": (None, str, "a SampleSet file or a `dinado sample` run directory (required)"),
        "variant": ("dinado-soft", str, "nado, dinado-hard, dinado-soft or dinado-merge"),
        "num_layers": (2, int, "guide module layers"),
        "lora_r": (16, int, "LoRA rank (dinado-merge)"),
        "lora_alpha": (32, int, "LoRA alpha (dinado-merge)"),
        "regularizer_weight": (None, float, "consistency regulariser weight (default: the variant's)"),
        "ce_positions": ("all", str, "cross-entropy on 'all' prefixes or the 'terminal' one"),
        "max_steps": (None, int, "training steps"),
        "epochs": (
            None,
            float,
            "epochs (default 1 when --max-steps is not given; with both, the smaller wins)",
        ),
        "batch_size": (32, int, "sequences per step"),
        "micro_batch_size": (None, int, "split steps into chunks for memory"),
        "learning_rate": (None, float, "default: the variant's"),
        "weight_clip": (None, float, "cap on self-normalised importance weights"),
        "use_weights": (True, "bool", "apply importance weights recorded in the samples"),
        "checkpoint_every": (200, int, "steps between checkpoints"),
        "resume": (False, "flag", "continue from the last checkpoint in --output"),
        "allow_no_positives": (False, "flag", "train even if no sample satisfies the oracle"),
        "report_to": ("none", str, "also log to 'wandb' (needs the wandb package), or 'none'"),
        "val_prompts": (None, str, "prompts file: track the guide's oracle success on them while training"),
        "val_every": (100, int, "steps between validation runs"),
        "val_max_new_tokens": (32, int, "tokens per validation sample"),
        **_ORACLE,
    },
    "generate": {
        **_COMMON,
        **_MODEL,
        **_DECODE,
        "guide": (None, str, "a saved guide directory (omit to decode with the base alone)"),
        "do_sample": (False, "bool", "sample instead of greedy/beam search"),
        "num_beams": (1, int, "beam width"),
        "alpha": (1.0, float, "guidance strength (1 = the method)"),
    },
    "evaluate": {
        **_COMMON,
        **_MODEL,
        **_ORACLE,
        "generations": (None, str, "a `dinado generate` run directory or generations.jsonl (required)"),
        "compare": (None, str, "another generate run (e.g. the base) to show side by side"),
        "references": (None, str, "a text file, one line per prompt, references separated by ' ||| '"),
        "train_run": (None, str, "a `dinado train` run directory: plot its training curves"),
    },
    "merge": {
        **_COMMON,
        **_MODEL,
        "guide": (None, str, "a saved dinado-merge guide directory (required)"),
    },
}


def _pretrain_spec() -> Spec:
    """`dinado pretrain` takes every PretrainConfig field as a key/flag."""
    import dataclasses

    from .pretrain import PretrainConfig

    kinds = {"int": int, "float": float, "str": str, "bool": "bool"}
    spec: Spec = dict(_COMMON)
    for f in dataclasses.fields(PretrainConfig):
        name = str(f.type).split("|")[0].strip()
        spec[f.name] = (f.default, kinds.get(name, str), f"PretrainConfig.{f.name} (see docs/pretrain.md)")
    spec["overwrite"] = (False, "flag", "replace an existing output directory")
    return spec


SPECS["pretrain"] = _pretrain_spec()


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _parse_bool(text: str) -> bool:
    lowered = str(text).lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_mapping(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not valid YAML/JSON: {exc}") from None


def load_config_file(path: str | None, command: str) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"config file {file} not found")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CLIError(f"cannot read config file {file}: {exc}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise CLIError(f"config file {file} must hold a mapping of keys to values")
    unknown = sorted(set(data) - set(SPECS[command]))
    if unknown:
        raise CLIError(
            f"unknown key(s) {', '.join(unknown)} in {file} for `dinado {command}`; "
            f"valid keys: {', '.join(sorted(SPECS[command]))}"
        )
    return data


def resolve(command: str, args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < flags given on the command line."""
    config = {key: default for key, (default, _, _) in SPECS[command].items()}
    config.update(load_config_file(args.config, command))
    for key in SPECS[command]:
        value = getattr(args, key, None)
        if value is not None:
            config[key] = value
    return config


def _require(config: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if config.get(key) in (None, ""):
            raise CLIError(f"--{key.replace('_', '-')} is required (or set `{key}:` in the config file)")


class RunDir:
    """The run directory: removed again if this command created it and failed (not on Ctrl-C)."""

    def __init__(self, path: str, keep_existing: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()) and not keep_existing:
            raise CLIError(f"output directory {self.path} is not empty: choose a new --output or remove it")
        self.created = not self.path.exists()

    def __enter__(self) -> RunDir:
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None and not issubclass(kind, KeyboardInterrupt) and self.created:
            shutil.rmtree(self.path, ignore_errors=True)

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=True))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------- loading
def load_base(config: dict[str, Any]):
    from .text import load_model

    name = config["base"]
    try:
        return load_model(name, config.get("tokenizer"))
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"cannot load base model or tokenizer {name!r}: {first}") from None


def load_guide(path: str, base):
    from .guide import Guide

    try:
        return Guide.from_pretrained(path, base)
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:
        raise CLIError(f"guide and base do not match: {exc}") from None


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"prompts file {file} not found")
    lines = [line.rstrip("\n") for line in file.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise CLIError(f"prompts file {file} holds no prompts (one per line)")
    return prompts


def text_oracle(config: dict[str, Any]):
    """The oracle described by --keywords or --oracle."""
    from .oracles import KeywordOracle, oracle_from_config

    if config.get("oracle") is not None and config.get("keywords"):
        raise CLIError("give either --oracle or --keywords, not both")
    if config.get("keywords"):
        words = config["keywords"]
        words = [w.strip() for w in words.split(",")] if isinstance(words, str) else list(words)
        words = [w for w in words if w]
        if not words:
            raise CLIError("empty keyword set: give at least one keyword, e.g. --keywords dog,frisbee")
        return KeywordOracle(words)
    if config.get("oracle") is not None:
        if not isinstance(config["oracle"], dict):
            raise CLIError("--oracle must be a mapping such as {type: regex, pattern: '^The'}")
        return oracle_from_config(config["oracle"])
    return None


def build_oracle(config: dict[str, Any], tokenizer):
    """The oracle on token ids, for sampling."""
    from .oracles import as_token_oracle

    oracle = text_oracle(config)
    if oracle is None:
        raise CLIError("an oracle is required: --keywords a,b or --oracle '{type: ..., ...}'")
    return as_token_oracle(oracle, tokenizer)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path} is not valid JSON lines: {exc}") from None


def read_generations(path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(rows of a generations.jsonl, metrics records of its run) from a `dinado generate` run or file."""
    p = Path(path)
    file = p / "generations.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise CLIError(f"generations file {file} not found (give a `dinado generate` run directory)")
    rows = read_jsonl(file)
    if not rows or any("prompt" not in r or "completion" not in r for r in rows):
        raise CLIError(f"{file} must hold JSON lines with 'prompt' and 'completion'")
    metrics_file = file.parent / "metrics.jsonl"
    return rows, read_jsonl(metrics_file) if metrics_file.is_file() else []


# ---------------------------------------------------------------------- subcommands
def cmd_sample(config: dict[str, Any]) -> None:
    """Sample completions from a base (or a guide as proposal) and label them with an oracle."""
    from .guide import is_encoder_decoder
    from .sampling import sample
    from .text import encode_prompts

    _require(config, "output", "base", "prompts")
    prompts = read_prompts(config["prompts"])
    with RunDir(config["output"]) as run:
        model, tokenizer = load_base(config)
        oracle = build_oracle(config, tokenizer)
        source = load_guide(config["guide"], model) if config.get("guide") else model
        run.write_config(config)
        start = time.perf_counter()
        samples = sample(
            source,
            encode_prompts(tokenizer, prompts, is_encoder_decoder(model)),
            config["num_samples"],
            oracle,
            config["max_new_tokens"],
            temperature=config["temperature"],
            top_p=config["top_p"],
            batch_size=config["batch_size"],
            seed=config["seed"],
            tokenizer=tokenizer,
            progress=True,
        )
        samples.save(run.path / "samples.safetensors")
        summary = {
            "samples": len(samples),
            "mean_label": samples.positive_rate,
            "positives": int((samples.labels > 0).sum()),
            "seconds": time.perf_counter() - start,
        }
        run.log(summary)
    print(
        f"wrote {len(samples)} samples to {run.path / 'samples.safetensors'} (mean label {samples.positive_rate:.3f})"
    )
    if summary["positives"] == 0:
        print("warning: no sample satisfied the oracle; a guide cannot be trained on these samples alone")


def _samples_path(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "samples.safetensors"
    if not p.is_file():
        raise CLIError(
            f"samples file {p} not found (give a .safetensors file or a `dinado sample` run directory)"
        )
    return p


def _start_wandb(config: dict[str, Any], run: RunDir):
    try:
        import wandb
    except ImportError:
        raise CLIError("--report-to wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="dinado", name=run.path.name, dir=str(run.path), config=config)


def _validator(config: dict[str, Any], guide, tokenizer) -> Callable[[], float] | None:
    """Success of the guide's samples on --val-prompts under the samples' oracle, or None when not asked."""
    if not config.get("val_prompts"):
        return None
    if text_oracle(config) is None:
        raise CLIError("--val-prompts needs the oracle to judge with: --keywords or --oracle")
    from .oracles import call_oracle

    prompts = read_prompts(config["val_prompts"])
    oracle = text_oracle(config)

    def validate() -> float:
        import torch

        from .text import generate_texts

        state = torch.get_rng_state()  # validation must not change the training run's random stream
        torch.manual_seed(config["seed"])
        texts, _, _ = generate_texts(
            guide,
            tokenizer,
            prompts,
            64,
            do_sample=True,
            top_k=0,
            max_new_tokens=config["val_max_new_tokens"],
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.set_rng_state(state)
        values = call_oracle(oracle, prompts, texts)
        return sum(values) / len(values)

    return validate


def cmd_train(config: dict[str, Any]) -> None:
    """Train a guide (NADO or DiNADO) on labelled samples; checkpoints, resume, metrics, TensorBoard."""
    from .guide import Guide
    from .samples import SampleSet
    from .training import train

    _require(config, "output", "base", "samples")
    samples = SampleSet.load(_samples_path(config["samples"]))
    if not bool((samples.labels > 0).any()) and not config["allow_no_positives"]:
        raise CLIError(
            f"no sample in {config['samples']} satisfies the oracle (all {len(samples)} labels are 0): a guide "
            "trained on them would be meaningless; sample more, sample from a proposal (`dinado sample --guide` or "
            "--temperature), add positives, or pass --allow-no-positives"
        )
    with RunDir(config["output"], keep_existing=config["resume"]) as run:
        model, tokenizer = load_base(config)
        import torch

        torch.manual_seed(config["seed"])  # the guide's initialisation must follow --seed too
        try:
            guide = Guide.create(
                model,
                config["variant"],
                tokenizer=tokenizer,
                num_layers=config["num_layers"],
                lora_r=config["lora_r"],
                lora_alpha=config["lora_alpha"],
                regularizer_weight=config["regularizer_weight"],
                ce_positions=config["ce_positions"],
            )
        except (TypeError, ValueError) as exc:
            raise CLIError(str(exc)) from None
        run.write_config(config)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run.path / "tensorboard"))
        wandb_run = _start_wandb(config, run) if config["report_to"] == "wandb" else None
        validate = _validator(config, guide, tokenizer)

        def on_step(step: int, values: dict[str, float]) -> None:
            record = {"step": step, **values}
            if validate is not None and (step % config["val_every"] == 0 or step == 1):
                record["val_success"] = validate()
            run.log(record)
            for key, value in record.items():
                if key != "step":
                    writer.add_scalar(f"train/{key}", value, step)
            if wandb_run is not None:
                wandb_run.log(record, step=step)

        report = train(
            guide,
            samples,
            max_steps=config["max_steps"],
            epochs=config["epochs"] if config["epochs"] is not None or config["max_steps"] else 1.0,
            batch_size=config["batch_size"],
            learning_rate=config["learning_rate"],
            seed=config["seed"],
            weight_clip=config["weight_clip"],
            use_weights=config["use_weights"],
            micro_batch_size=config["micro_batch_size"],
            progress=True,
            checkpoint_dir=run.path / "checkpoints",
            checkpoint_every=config["checkpoint_every"],
            resume=config["resume"],
            on_step=on_step,
        )
        writer.close()
        if wandb_run is not None:
            wandb_run.finish()
        guide.save_pretrained(run.path / "guide")
        atomic_write_text(run.path / "train_report.json", json.dumps(report.to_dict()))
    print(f"trained a {config['variant']} guide for {report.steps} steps; saved to {run.path / 'guide'}")


def cmd_generate(config: dict[str, Any]) -> None:
    """Decode prompts with the base alone or with a guide (greedy, sampling or beam search)."""
    import torch

    from .text import generate_texts

    _require(config, "output", "base", "prompts")
    prompts = read_prompts(config["prompts"])
    with RunDir(config["output"]) as run:
        model, tokenizer = load_base(config)
        guide = load_guide(config["guide"], model) if config.get("guide") else None
        run.write_config(config)
        torch.manual_seed(config["seed"])
        kwargs = dict(
            max_new_tokens=config["max_new_tokens"],
            do_sample=config["do_sample"],
            num_beams=config["num_beams"],
            pad_token_id=tokenizer.pad_token_id,
        )
        if config["do_sample"]:
            kwargs.update(top_k=0, temperature=config["temperature"], top_p=config["top_p"])
        outputs, new_tokens, seconds = generate_texts(
            guide if guide is not None else model,
            tokenizer,
            prompts,
            config["batch_size"],
            config["alpha"],
            **kwargs,
        )
        lines = [
            json.dumps({"prompt": p, "completion": c.strip()}) for p, c in zip(prompts, outputs, strict=True)
        ]
        atomic_write_text(run.path / "generations.jsonl", "\n".join(lines) + "\n")
        run.log(
            {
                "prompts": len(prompts),
                "new_tokens": new_tokens,
                "seconds": seconds,
                "tokens_per_second": new_tokens / max(seconds, 1e-9),
            }
        )
    print(f"wrote {len(outputs)} generations to {run.path / 'generations.jsonl'}")


def cmd_merge(config: dict[str, Any]) -> None:
    """Fold a DiNADO-Merge guide's LoRA into the base: a plain model at the base's cost."""
    _require(config, "output", "base", "guide")
    with RunDir(config["output"]) as run:
        model, tokenizer = load_base(config)
        guide = load_guide(config["guide"], model)
        try:
            merged = guide.merge()
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        tmp = run.path / ".model.tmp"
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(run.path / "model")
        run.write_config(config)
    print(
        f"wrote the merged model to {run.path / 'model'} (load it with AutoModelForCausalLM.from_pretrained)"
    )


def cmd_evaluate(config: dict[str, Any]) -> None:
    """Score generations: oracle success, coverage, BLEU, base perplexity, distinct-n; write a report."""
    from .evaluation import evaluate_texts, markdown_report, plot_training_curves

    _require(config, "output", "generations")
    runs = {"guide": read_generations(config["generations"])}
    if config.get("compare"):
        runs = {"base": read_generations(config["compare"]), **runs}
        if [r["prompt"] for r in runs["base"][0]] != [r["prompt"] for r in runs["guide"][0]]:
            raise CLIError("--compare must hold generations for the same prompts in the same order")
    oracle = text_oracle(config)
    references = None
    if config.get("references"):
        ref_file = Path(config["references"])
        if not ref_file.is_file():
            raise CLIError(f"references file {ref_file} not found")
        references = [line.split(" ||| ") for line in ref_file.read_text(encoding="utf-8").splitlines()]
        if len(references) != len(runs["guide"][0]):
            raise CLIError(f"{ref_file} has {len(references)} lines for {len(runs['guide'][0])} generations")
    curves = None
    if config.get("train_run"):
        curves = Path(config["train_run"]) / "metrics.jsonl"
        if not curves.is_file():
            raise CLIError(f"training metrics {curves} not found (give a `dinado train` run directory)")
    with RunDir(config["output"]) as run:
        model = tokenizer = None
        if config.get("base"):
            model, tokenizer = load_base(config)
        run.write_config(config)
        results: dict[str, dict[str, float]] = {}
        for name, (rows, records) in runs.items():
            prompts = [r["prompt"] for r in rows]
            outputs = [r["completion"] for r in rows]
            results[name] = evaluate_texts(prompts, outputs, oracle, references, model, tokenizer)
            speed = [r["tokens_per_second"] for r in records if "tokens_per_second" in r]
            if speed:
                results[name]["tokens_per_second"] = speed[-1]
            run.log({"system": name, **results[name]})
        atomic_write_text(run.path / "metrics.json", json.dumps(results, indent=2))
        if curves is not None:
            plot_training_curves(read_jsonl(curves), run.path / "training_curves.png")
        names = list(runs)
        examples = [  # one row per prompt: each system's completion of it
            {
                "prompt": same[0]["prompt"],
                **{name: row["completion"] for name, row in zip(names, same, strict=True)},
            }
            for same in zip(*(rows for rows, _ in runs.values()), strict=True)
        ][:20]
        atomic_write_text(run.path / "report.md", markdown_report(results, examples, list(runs)))
    for name, values in results.items():
        print(name, " ".join(f"{k}={v:.4g}" for k, v in values.items()))
    print(f"wrote {run.path / 'report.md'}")


def cmd_pretrain(config: dict[str, Any]) -> None:
    """Train a byte-level BPE tokenizer and a small base (GPT-2, or Marian with --architecture marian) on a text file or pairs."""
    from .pretrain import PretrainConfig, pretrain

    _require(config, "output")
    fields = {k: v for k, v in config.items() if k not in ("output", "overwrite")}
    try:
        pretrain_config = PretrainConfig.from_dict(fields)
        pretrain_config.validate()
    except TypeError as exc:
        raise CLIError(str(exc)) from None
    output = Path(config["output"])
    if output.exists() and any(output.iterdir()) and not config["overwrite"]:
        raise CLIError(f"output directory {output} is not empty: choose a new --output or pass --overwrite")
    result = pretrain(pretrain_config, output, overwrite=config["overwrite"])
    atomic_write_text(output / "config.yaml", yaml.safe_dump(config, sort_keys=True))
    print(
        f"pretrained {result.num_parameters:,} parameters for {result.steps} steps "
        f"(best held-out loss {result.best_val_loss:.3f} at step {result.best_step}"
        f"{', stopped early' if result.stopped_early else ''}); saved to {output}"
    )


def cmd_demo(config: dict[str, Any]) -> None:
    """The embedded demo: toy language, pretrained base, NADO / DiNADO guides, one table."""
    from .demo import run_demo

    run_demo(config["output"] or "runs/demo", config["seed"], config["quick"], config["threads"])


SPECS["demo"] = {
    "output": ("runs/demo", str, "run directory (the pretrained base is cached there)"),
    "seed": (0, int, "random seed"),
    "quick": (False, "flag", "a smaller, faster run"),
    "threads": (1, int, "torch threads (1 is fastest for the demo's small models on 2 cores)"),
}


COMMANDS = {
    "pretrain": cmd_pretrain,
    "demo": cmd_demo,
    "sample": cmd_sample,
    "train": cmd_train,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "evaluate": cmd_evaluate,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinado", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, spec in SPECS.items():
        p = sub.add_parser(
            name,
            help=COMMANDS[name].__doc__ or name,
            description=f"dinado {name}: flags override the --config file; unknown config keys are an error.",
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", help="a YAML file with any of the keys below (flags win)")
        for key, (default, kind, text) in spec.items():
            flag = "--" + key.replace("_", "-")
            shown = f"{text} (default: {default})" if default is not None else text
            if kind == "flag":
                p.add_argument(flag, dest=key, action="store_const", const=True, default=None, help=shown)
            elif kind == "bool":
                p.add_argument(flag, dest=key, type=_parse_bool, default=None, help=shown, metavar="BOOL")
            elif kind is None:
                p.add_argument(flag, dest=key, type=_parse_mapping, default=None, help=shown)
            else:
                p.add_argument(flag, dest=key, type=kind, default=None, help=shown)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = resolve(args.command, args)
        COMMANDS[args.command](config)
    except (CLIError, ValueError, FileNotFoundError, OracleError) as exc:
        message = " ".join(str(exc).split())
        print(f"dinado {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
