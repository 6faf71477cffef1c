"""The `dinado` command: thin subcommands over the Python API, each reading a YAML config plus flags.

Every subcommand writes a run directory: the resolved config (config.yaml), a metrics JSONL and its outputs.
Bad input ends with one line on stderr naming the problem and exit code 2, and leaves nothing half-written.
Ctrl-C (SIGINT) and SIGTERM end with one line and exit 130 / 143: `train` stops after the current step and
keeps a checkpoint for `--resume`; every other subcommand builds its run directory under a hidden temporary
name and renames it into place at the end, so an interrupted run leaves nothing behind. docs/errors.md lists
every kind of bad input, its message and what is left on disk.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ._utils import atomic_directory, atomic_write_text
from ._version import __version__
from .oracles import OracleError

EXAMPLES = {
    "pretrain": "dinado pretrain --data-format text --text-file corpus.txt --output runs/base --n-layer 4",
    "demo": "dinado demo --output runs/demo",
    "sample": "dinado sample --base runs/base --prompts prompts.txt --keywords dog,frisbee --output runs/samples",
    "train": "dinado train --base runs/base --samples runs/samples --variant dinado-soft --output runs/guide",
    "generate": "dinado generate --base smollm2-135m-instruct --prompts concepts.txt --prompt-template "
    "'Write one short sentence that uses all of these words: {keywords}.' --output runs/gen",
    "evaluate": "dinado evaluate --generations runs/gen --compare runs/gen-base --keywords dog --output runs/eval",
    "merge": "dinado merge --base runs/base --guide runs/guide-merge/guide --output runs/merged",
}


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


# ---------------------------------------------------------------------- value parsing
# One parser per kind of value, used for flags (argparse `type=`) and for config-file values alike, so that
# `--max-steps 5.7` and `max_steps: 5.7` get the same answer.
def _parse_int(text: Any) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _parse_float(text: Any) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.5 or 1e-3, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(parse: Callable[[Any], Any], ok: Callable[[Any], bool], rule: str) -> Callable[[Any], Any]:
    """``parse``, then a range check that says ``rule`` and the value it got."""

    def parse_bounded(text: Any) -> Any:
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {value:g}")
        return value

    return parse_bounded


_parse_count = _bounded(_parse_int, lambda v: v >= 1, "must be at least 1")
_parse_positive = _bounded(_parse_float, lambda v: v > 0, "must be greater than 0")
_parse_nonnegative = _bounded(_parse_float, lambda v: v >= 0, "must be 0 or more")
_parse_probability = _bounded(_parse_float, lambda v: 0 < v <= 1, "must be in (0, 1]")


def _parse_bool(text: Any) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_str(text: Any) -> str:
    return str(text)


def _parse_auto_bool(text: Any) -> str | bool:
    return "auto" if str(text).strip().lower() == "auto" else _parse_bool(text)


def _parse_mapping(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise argparse.ArgumentTypeError(f"not valid YAML/JSON: {' '.join(str(exc).split())}") from None


# kind name -> (parser, what a value looks like in messages)
KINDS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "int": (_parse_int, "a whole number"),
    "count": (_parse_count, "a whole number >= 1"),
    "float": (_parse_float, "a number"),
    "positive": (_parse_positive, "a number > 0"),
    "nonnegative": (_parse_nonnegative, "a number >= 0"),
    "probability": (_parse_probability, "a number in (0, 1]"),
    "str": (_parse_str, "a string"),
    "bool": (_parse_bool, "true or false"),
    "auto_bool": (_parse_auto_bool, "auto, true or false"),
    "flag": (_parse_bool, "true or false"),
    "mapping": (_parse_mapping, "a mapping"),
}
NONE_WORDS = ("none", "null")


class _NoneValue:
    """`--max-epochs none` for a key that may be null: overrides a non-null default with None."""

    def __repr__(self) -> str:
        return "none"


NONE = _NoneValue()

# The schema of each subcommand: key -> (default, kind, help); kind is a key of KINDS. A key may be null
# (None) when its default is None or the command lists it in NULLABLE. Config files may hold only these keys.
Spec = dict[str, tuple[Any, str, str]]
NULLABLE: dict[str, set[str]] = {}
_COMMON: Spec = {
    "output": (None, "str", "the run directory to write (required)"),
    "seed": (0, "int", "random seed"),
}
_MODEL: Spec = {
    "base": (
        None,
        "str",
        "base model: a hub id, a local directory, a .gguf file or a named offline base "
        "(smollm2-135m-instruct) (required)",
    ),  # fmt: skip
    "gguf_file": (None, "str", "a GGUF file inside the --base directory or hub repository"),
    "tokenizer": (None, "str", "tokenizer id or path (default: the base's)"),
}
_PROMPT: Spec = {
    "prompt_template": (
        None,
        "str",
        "a template for each prompt line, with {prompt} (the line) and/or {keywords} (the line as "
        "a keyword list, joined by ', '), e.g. 'Write one short sentence that uses all of these words: "
        "{keywords}.'; oracles still read the line itself",
    ),  # fmt: skip
    "chat": (
        "auto",
        "auto_bool",
        "put each prompt in the user turn of the tokenizer's chat template and stop at "
        "its end of turn (auto: when the tokenizer has a chat template)",
    ),  # fmt: skip
}
_ORACLE: Spec = {
    "oracle": (None, "mapping", "an oracle config (YAML/JSON mapping), see docs/oracles.md"),
    "keywords": (None, "str", "shortcut for a keyword oracle: comma-separated keywords"),
}
_DECODE: Spec = {
    "prompts": (None, "str", "a text file with one prompt per line (required)"),
    "max_new_tokens": (32, "count", "tokens to generate per prompt"),
    "temperature": (1.0, "positive", "sampling temperature"),
    "top_p": (1.0, "probability", "nucleus sampling threshold"),
    "batch_size": (32, "count", "prompts per batch"),
}
_OVERWRITE: Spec = {
    "overwrite": (False, "flag", "replace an existing output directory (only once the new one is complete)"),
}
_MISMATCH: Spec = {
    "allow_base_mismatch": (
        False,
        "flag",
        "use a guide or samples with a base or tokenizer other than the one they were made with",
    ),
}
SPECS: dict[str, Spec] = {
    "sample": {
        **_COMMON,
        **_MODEL,
        **_DECODE,
        **_PROMPT,
        **_ORACLE,
        "guide": (None, "str", "sample from this guide as a proposal (importance weights are recorded)"),
        "num_samples": (8, "count", "completions per prompt"),
        **_OVERWRITE,
        **_MISMATCH,
    },
    "train": {
        **_COMMON,
        **_MODEL,
        "samples": (None, "str", "a SampleSet file or a `dinado sample` run directory (required)"),
        "variant": ("dinado-soft", "str", "nado, dinado-hard, dinado-soft or dinado-merge"),
        "num_layers": (2, "count", "guide module layers"),
        "lora_r": (16, "count", "LoRA rank (dinado-merge)"),
        "lora_alpha": (32, "count", "LoRA alpha (dinado-merge)"),
        "regularizer_weight": (
            None,
            "nonnegative",
            "consistency regulariser weight (default: the variant's)",
        ),  # fmt: skip
        "ce_positions": ("all", "str", "cross-entropy on 'all' prefixes or the 'terminal' one"),
        "head": (
            "full",
            "str",
            "guide token head: 'full' (its own) or 'tied' (the base's output embeddings)",
        ),
        "head_rank": (None, "count", "rank of the guide token head's [V, r] matrix (default: full rank)"),
        "read_tokens": (False, "bool", "the guide module also reads the base's embedding of each token"),
        "pointer": (
            True,
            "bool",
            "the guide module scores earlier tokens for copying, e.g. prompt keywords (module variants)",
        ),  # fmt: skip
        "max_steps": (None, "count", "training steps"),
        "epochs": (
            None,
            "positive",
            "epochs (default 1 when --max-steps is not given; with both, the smaller wins)",
        ),  # fmt: skip
        "batch_size": (64, "count", "sequences per step (as dinado.train)"),
        "micro_batch_size": (None, "count", "split steps into chunks for memory"),
        "learning_rate": (None, "positive", "default: the variant's"),
        "weight_clip": (None, "positive", "cap on self-normalised importance weights"),
        "use_weights": (True, "bool", "apply importance weights recorded in the samples"),
        "checkpoint_every": (200, "count", "steps between checkpoints"),
        "resume": (False, "flag", "continue from the last checkpoint in --output"),
        "allow_no_positives": (False, "flag", "train even if no sample satisfies the oracle"),
        "report_to": ("none", "str", "also log to 'wandb' (needs the wandb package), or 'none'"),
        "val_prompts": (None, "str", "prompts file: track the guide's oracle success on them while training"),
        "val_every": (100, "count", "steps between validation runs"),
        "val_max_new_tokens": (32, "count", "tokens per validation sample"),
        **_PROMPT,
        **_ORACLE,
        **_MISMATCH,
    },
    "generate": {
        **_COMMON,
        **_MODEL,
        **_DECODE,
        **_PROMPT,
        "guide": (None, "str", "a saved guide directory (omit to decode with the base alone)"),
        "do_sample": (False, "bool", "sample instead of greedy/beam search"),
        "num_beams": (1, "count", "beam width"),
        "num_return_sequences": (1, "count", "outputs per prompt (with --do-sample true)"),
        "alpha": (1.0, "nonnegative", "guidance strength (1 = the method)"),
        "candidates": (
            None,
            "count",
            "guide only the base's top-k tokens and the tokens so far (cheaper head; approximates q_theta)",
        ),  # fmt: skip
        **_OVERWRITE,
        **_MISMATCH,
    },
    "evaluate": {
        **_COMMON,
        **_MODEL,
        **_ORACLE,
        "generations": (None, "str", "a `dinado generate` run directory or generations.jsonl (required)"),
        "compare": (None, "str", "another generate run (e.g. the base) to show side by side"),
        "references": (None, "str", "a text file, one line per prompt, references separated by ' ||| '"),
        "train_run": (None, "str", "a `dinado train` run directory: plot its training curves"),
        "prompt_template": (None, "str", "as for generate (default: the --generations run's)"),
        "chat": (None, "auto_bool", "as for generate (default: the --generations run's)"),
        **_OVERWRITE,
    },
    "merge": {
        **_COMMON,
        **_MODEL,
        "guide": (None, "str", "a saved dinado-merge guide directory (required)"),
        **_OVERWRITE,
        **_MISMATCH,
    },
}


def _pretrain_spec() -> Spec:
    """`dinado pretrain` takes every PretrainConfig field as a key/flag (its own checks then apply)."""
    import dataclasses

    from .pretrain import PretrainConfig

    spec: Spec = dict(_COMMON)
    nullable = set()
    for f in dataclasses.fields(PretrainConfig):
        parts = [part.strip() for part in str(f.type).split("|")]
        kind = parts[0] if parts[0] in ("int", "float", "bool") else "str"
        if "None" in parts:
            nullable.add(f.name)
        spec[f.name] = (f.default, kind, f"PretrainConfig.{f.name} (see docs/pretrain.md)")
    spec.update(_OVERWRITE)
    NULLABLE["pretrain"] = nullable
    return spec


SPECS["pretrain"] = _pretrain_spec()


def _nullable(command: str, key: str) -> bool:
    return SPECS[command][key][0] is None or key in NULLABLE.get(command, set())


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def coerce_config_value(command: str, key: str, value: Any, file: Path) -> Any:
    """A config-file value through the same parser as its flag: `learning_rate: 1e-3` (a string to PyYAML)
    becomes 0.001, `max_steps: 5.7` is refused as `--max-steps 5.7` is."""
    _, kind, _ = SPECS[command][key]
    where = f"`{key}:` in {file}"
    expected = f"expected {KINDS[kind][1]}, as for {_flag(key)}"
    if value is None:
        if _nullable(command, key):
            return None
        raise CLIError(f"{where} is empty: give {KINDS[kind][1]} (as for {_flag(key)}) or remove the key")
    if kind == "mapping":
        return value
    if key == "keywords" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    if isinstance(value, (list, dict)) or (isinstance(value, bool) and kind not in ("bool", "flag")):
        shown = str(value).lower() if isinstance(value, bool) else json.dumps(value)
        raise CLIError(f"{where} is {shown}: {expected}")
    if isinstance(value, float) and kind in ("int", "count"):
        raise CLIError(f"{where} is {value!r}: {expected}")
    try:
        return KINDS[kind][0](value)
    except argparse.ArgumentTypeError as exc:
        raise CLIError(f"{where}: {exc} (as for {_flag(key)})") from None


def load_config_file(path: str | None, command: str) -> dict[str, Any]:
    if path is None:
        return {}
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"config file {file} not found: check the --config path")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        reason = " ".join(str(exc).split())
        raise CLIError(
            f"cannot read config file {file}: {reason}; fix the YAML (key: value per line)"
        ) from None
    if not isinstance(data, dict):
        raise CLIError(f"config file {file} must hold a mapping of keys to values (key: value per line)")
    unknown = sorted(map(str, set(data) - set(SPECS[command])))
    if unknown:
        close = {k: difflib.get_close_matches(k, SPECS[command], n=1) for k in unknown}
        hints = [f"{k} (did you mean {c[0]}?)" if c else k for k, c in close.items()]
        raise CLIError(
            f"unknown key(s) {', '.join(hints)} in {file} for `dinado {command}`; "
            f"valid keys: {', '.join(sorted(SPECS[command]))}"
        )
    return {key: coerce_config_value(command, key, value, file) for key, value in data.items()}


def resolve(command: str, args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < config file < flags given on the command line."""
    config = {key: default for key, (default, _, _) in SPECS[command].items()}
    config.update(load_config_file(args.config, command))
    for key in SPECS[command]:
        value = getattr(args, key, None)
        if value is NONE:
            config[key] = None
        elif value is not None:
            config[key] = value
    return config


def _require(config: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if config.get(key) in (None, ""):
            raise CLIError(f"{_flag(key)} is required (or set `{key}:` in the config file)")


# ---------------------------------------------------------------------- run directories and interruptions
class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so every cleanup runs."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM; the message says what is left on disk."""

    def __init__(self, terminated: bool, note: str) -> None:
        super().__init__(note)
        self.terminated = terminated


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


class Run:
    """A run directory: ``path`` is where files go now, ``final`` where the run ends up."""

    def __init__(self, path: Path, final: Path) -> None:
        self.path, self.final = path, final

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=True))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _check_output(
    path: Path, overwrite: bool, hint: str = "choose a new --output or pass --overwrite"
) -> None:
    if path.exists() and not path.is_dir():
        raise CLIError(f"output {path} exists and is not a directory: choose another --output")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CLIError(f"output directory {path} is not empty: {hint}")


@contextmanager
def fresh_run(config: dict[str, Any]) -> Iterator[Run]:
    """A run directory built under a hidden temporary name and renamed into place when the command succeeds:
    an error, Ctrl-C or SIGTERM leaves nothing at --output (and an existing one untouched)."""
    final = Path(config["output"])
    overwrite = bool(config.get("overwrite"))
    _check_output(final, overwrite)
    try:
        with atomic_directory(final, overwrite=overwrite) as tmp:
            yield Run(tmp, final)
    except KeyboardInterrupt as exc:
        left = "left as it was" if final.exists() else "not created"
        raise Interrupted(
            isinstance(exc, Terminated), f"nothing was written ({final} {left}); run the command again"
        ) from None


# ---------------------------------------------------------------------- loading
def load_base(config: dict[str, Any]):
    from .hf import load_model

    name = config["base"]
    try:
        return load_model(name, config.get("tokenizer"), config.get("gguf_file"))
    except FileNotFoundError as exc:
        raise CLIError(f"cannot load base model {name!r}: {exc}") from None
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(
            f"cannot load base model or tokenizer {name!r}: {first} (give a local model directory or a "
            "hub id that is reachable)"
        ) from None


def load_guide(config: dict[str, Any], base, tokenizer):
    from .guide import BaseMismatchError, Guide

    path = Path(config["guide"])
    if (path / "guide" / "dinado_config.json").is_file() and not (path / "dinado_config.json").is_file():
        raise CLIError(f"{path} is a `dinado train` run directory: pass its guide, --guide {path / 'guide'}")
    try:
        return Guide.from_pretrained(
            path, base, tokenizer=tokenizer, allow_base_mismatch=bool(config.get("allow_base_mismatch"))
        )
    except FileNotFoundError as exc:
        raise CLIError(str(exc)) from None
    except BaseMismatchError as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:
        raise CLIError(f"guide and base do not match: {exc}") from None


def read_prompt_lines(path: str) -> tuple[list[str], list[int]]:
    """The non-empty lines of a prompts file and their line numbers (1-based)."""
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"prompts file {file} not found: give a text file with one prompt per line")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(
            f"prompts file {file} is not UTF-8 text: give a text file with one prompt per line"
        ) from None
    numbered = [(i, line) for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not numbered:
        raise CLIError(f"prompts file {file} holds no prompts: write one prompt per line")
    return [line for _, line in numbered], [i for i, _ in numbered]


def read_prompts(path: str) -> list[str]:
    return read_prompt_lines(path)[0]


def prompt_format(config: dict[str, Any], tokenizer, model=None):
    """The PromptFormat of --prompt-template and --chat (auto: chat when the tokenizer has a template)."""
    from .hf import is_encoder_decoder
    from .text import PromptFormat

    chat = config.get("chat", "auto")
    if chat in ("auto", None):
        seq2seq = model is not None and is_encoder_decoder(model)
        chat = bool(getattr(tokenizer, "chat_template", None)) and not seq2seq
    try:
        return PromptFormat(config.get("prompt_template") or "{prompt}", bool(chat))
    except ValueError as exc:
        raise CLIError(f"--prompt-template: {exc}") from None


def text_oracle(config: dict[str, Any]):
    """The oracle described by --keywords or --oracle; with neither, a template with a {keywords} slot
    implies the keyword oracle on each prompt line's keyword list."""
    from .oracles import KeywordList, KeywordOracle, oracle_from_config

    if config.get("oracle") is None and not config.get("keywords"):
        if "{keywords}" in (config.get("prompt_template") or ""):
            return KeywordOracle(KeywordList())

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


def build_oracle(config: dict[str, Any], tokenizer, prompt_texts=None):
    """The oracle on token ids, for sampling; ``prompt_texts`` maps each prompt's ids to its line."""
    from .oracles import as_token_oracle

    oracle = text_oracle(config)
    if oracle is None:
        raise CLIError("an oracle is required: --keywords a,b or --oracle '{type: ..., ...}'")
    return as_token_oracle(oracle, tokenizer, prompt_texts)


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
def check_prompt_lengths(
    model, rows: list[list[int]], max_new_tokens: int, file: str, lines: list[int]
) -> None:
    """Name the first prompt line that, with --max-new-tokens, runs past the model's positions."""
    from .hf import check_length

    for row, line in zip(rows, lines, strict=True):
        try:
            check_length(model, len(row), max_new_tokens)
        except ValueError as exc:
            raise CLIError(f"{file} line {line}: {exc}") from None


def _sample_summary(samples) -> str:
    n = len(samples)
    labels = samples.labels
    satisfied = int((labels >= 0.5).sum())
    text = f"{satisfied:,} of {n:,} samples ({satisfied / n:.1%}) satisfy the oracle"
    soft = bool(((labels > 0) & (labels < 1)).any())
    return text + (f" (labels are soft: mean label {float(labels.mean()):.3f})" if soft else "")


def cmd_sample(config: dict[str, Any]) -> None:
    """Sample completions from a base (or a guide as proposal) and label them with an oracle."""
    from .hf import is_encoder_decoder
    from .sampling import sample
    from .text import encode_prompts, end_of_turn_id

    _require(config, "output", "base", "prompts")
    prompts, lines = read_prompt_lines(config["prompts"])
    _check_output(Path(config["output"]), config["overwrite"])
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
            temperature=config["temperature"],
            top_p=config["top_p"],
            batch_size=config["batch_size"],
            seed=config["seed"],
            eos_token_id=end_of_turn_id(tokenizer) if fmt.chat else None,
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
        f"wrote {len(samples):,} samples to {run.final / 'samples.safetensors'}: {_sample_summary(samples)}"
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


def _start_wandb(config: dict[str, Any], run: Run):
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
    fmt = prompt_format(config, tokenizer, guide.base)

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
            prompt_format=fmt,
            do_sample=True,
            top_k=0,
            max_new_tokens=config["val_max_new_tokens"],
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.set_rng_state(state)
        values = call_oracle(oracle, prompts, texts)
        return sum(values) / len(values)

    return validate


class StopRequest:
    """While training: the first Ctrl-C or SIGTERM asks to stop after the current step (with a checkpoint);
    a second one stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.signum = signum
        print(
            "\ndinado train: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        try:
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave the signals alone
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _checkpoint_step(path: Path | None) -> int:
    from .training import CHECKPOINT_PREFIX

    return int(path.name[len(CHECKPOINT_PREFIX) :]) if path is not None else 0


def _truncate_metrics(file: Path, last_step: int) -> None:
    """Keep the records of steps <= ``last_step``: the resumed run writes the later ones again."""
    if not file.is_file():
        return
    kept = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by SIGKILL
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_text(file, "".join(line + "\n" for line in kept))


def _train_leftover(output: Path, created: bool) -> str:
    """What an interrupted `train` leaves: a resumable directory, or none."""
    from .training import latest_checkpoint

    checkpoint = latest_checkpoint(output / "checkpoints")
    if checkpoint is not None:
        return f"{output} keeps {checkpoint.name}: continue with the same command and --resume"
    if created:
        shutil.rmtree(output, ignore_errors=True)
        return f"no checkpoint had been written, so {output} was removed; run the command again"
    return f"{output} holds no checkpoint yet: --resume starts from step 0"


def cmd_train(config: dict[str, Any]) -> None:
    """Train a guide (NADO or DiNADO) on labelled samples; checkpoints, resume, metrics, TensorBoard."""
    import torch

    from .data import SampleSet
    from .guide import Guide
    from .training import check_samples, latest_checkpoint, train

    _require(config, "output", "base", "samples")
    samples = SampleSet.load(_samples_path(config["samples"]))
    if not bool((samples.labels > 0).any()) and not config["allow_no_positives"]:
        raise CLIError(
            f"no sample in {config['samples']} satisfies the oracle (all {len(samples)} labels are 0): a guide "
            "trained on them would be meaningless; sample more, sample from a proposal (`dinado sample --guide` or "
            "--temperature), add positives, or pass --allow-no-positives"
        )
    output = Path(config["output"])
    if not config["resume"]:
        _check_output(output, False, "choose a new --output, or continue that run with --resume")
    elif output.exists() and not output.is_dir():
        raise CLIError(f"output {output} exists and is not a directory: choose another --output")
    model, tokenizer = load_base(config)
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
            **(
                {}
                if config["variant"] == "dinado-merge"
                else {
                    "head": config["head"],
                    "head_rank": config["head_rank"],
                    "read_tokens": config["read_tokens"],
                    "pointer": config["pointer"],
                }
            ),
        )
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    check_samples(guide, samples, config["allow_base_mismatch"])
    resume_step = 0
    if config["resume"]:
        checkpoint = latest_checkpoint(output / "checkpoints")
        resume_step = _checkpoint_step(checkpoint)
        if checkpoint is not None:
            saved = json.loads((checkpoint / "dinado_config.json").read_text()).get("variant")
            if saved != config["variant"]:
                raise CLIError(
                    f"{checkpoint} holds a {saved} guide but --variant is {config['variant']}: resume with "
                    f"--variant {saved}, or train {config['variant']} into another --output"
                )
            print(f"resuming {output} from {checkpoint.name} (step {resume_step})", flush=True)
        else:
            print(
                f"--resume: no checkpoint in {output / 'checkpoints'} yet: starting from step 0", flush=True
            )
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    run = Run(output, output)
    stop = StopRequest()
    try:
        _truncate_metrics(run.path / "metrics.jsonl", resume_step)
        run.write_config(config)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(
            str(run.path / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
        )
        try:
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

            with stop.installed():
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
                    allow_base_mismatch=config["allow_base_mismatch"],
                    should_stop=lambda: stop.signum is not None,
                )
            if wandb_run is not None:
                wandb_run.finish()
        finally:
            writer.close()
        if report.stopped_early:
            raise Interrupted(
                stop.signum == signal.SIGTERM,
                f"stopped after step {report.steps}; {output} keeps checkpoint-{report.steps}: continue with "
                "the same command and --resume",
            )
        guide.save_pretrained(run.path / "guide")
        atomic_write_text(run.path / "train_report.json", json.dumps(report.to_dict()))
    except Interrupted:
        raise
    except KeyboardInterrupt as exc:
        raise Interrupted(isinstance(exc, Terminated), _train_leftover(output, created)) from None
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise
    print(f"trained a {config['variant']} guide for {report.steps} steps; saved to {run.path / 'guide'}")


def cmd_generate(config: dict[str, Any]) -> None:
    """Decode prompts with the base alone or with a guide (greedy, sampling or beam search)."""
    import torch

    from .hf import is_encoder_decoder
    from .text import encode_prompts, generate_texts

    _require(config, "output", "base", "prompts")
    prompts, lines = read_prompt_lines(config["prompts"])
    copies = config["num_return_sequences"]
    if copies > 1 and not config["do_sample"]:
        raise CLIError(
            f"--num-return-sequences {copies} needs --do-sample true: greedy and beam search give the same "
            "output every time"
        )
    _check_output(Path(config["output"]), config["overwrite"])
    model, tokenizer = load_base(config)
    guide = load_guide(config, model, tokenizer) if config.get("guide") else None
    if config["candidates"] is not None and (guide is None or guide.module is None):
        raise CLIError(
            "--candidates restricts a guide module's head to the top-k tokens: it needs --guide with a NADO, "
            "DiNADO-Hard or DiNADO-Soft guide (a merged or Merge guide already decodes at the base's cost)"
        )
    fmt = prompt_format(config, tokenizer, model)
    rows = encode_prompts(tokenizer, prompts, is_encoder_decoder(model), fmt)
    check_prompt_lengths(model, rows, config["max_new_tokens"], config["prompts"], lines)
    with fresh_run(config) as run:
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
        if config["candidates"] is not None:
            kwargs["candidates"] = config["candidates"]
        expanded = [p for p in prompts for _ in range(copies)]  # each prompt's samples side by side
        outputs, new_tokens, seconds = generate_texts(
            guide if guide is not None else model,
            tokenizer,
            expanded,
            config["batch_size"],
            config["alpha"],
            prompt_format=fmt,
            **kwargs,
        )
        records = [
            {"prompt": p, "completion": c.strip(), **({"sample": i % copies} if copies > 1 else {})}
            for i, (p, c) in enumerate(zip(expanded, outputs, strict=True))
        ]
        atomic_write_text(run.path / "generations.jsonl", "".join(json.dumps(r) + "\n" for r in records))
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


def cmd_merge(config: dict[str, Any]) -> None:
    """Fold a DiNADO-Merge guide's LoRA into the base: a plain model at the base's cost."""
    _require(config, "output", "base", "guide")
    _check_output(Path(config["output"]), config["overwrite"])
    model, tokenizer = load_base(config)
    guide = load_guide(config, model, tokenizer)
    try:
        merged = guide.merge()
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


def cmd_evaluate(config: dict[str, Any]) -> None:
    """Score generations: oracle success, coverage, BLEU, base perplexity, distinct-n; write a report."""
    from .evaluation import evaluate_texts, markdown_report, plot_training_curves

    _require(config, "output", "generations")
    runs = {"guide": read_generations(config["generations"])}
    if config.get("compare"):
        runs = {"base": read_generations(config["compare"]), **runs}
        if [r["prompt"] for r in runs["base"][0]] != [r["prompt"] for r in runs["guide"][0]]:
            raise CLIError(
                "--compare must hold generations for the same prompts in the same order (and the same "
                "--num-return-sequences): generate both from the same prompts file"
            )
    decoding = _decoding_config(config)  # the prompt format the generations were made with
    oracle = text_oracle(decoding | {k: config[k] for k in ("oracle", "keywords")})
    references = None
    if config.get("references"):
        ref_file = Path(config["references"])
        if not ref_file.is_file():
            raise CLIError(f"references file {ref_file} not found: give one line of references per prompt")
        references = [line.split(" ||| ") for line in ref_file.read_text(encoding="utf-8").splitlines()]
        if len(references) != len(runs["guide"][0]):
            raise CLIError(
                f"{ref_file} has {len(references)} lines for {len(runs['guide'][0])} generations: give one "
                "line per generation"
            )
    curves = None
    if config.get("train_run"):
        curves = Path(config["train_run"]) / "metrics.jsonl"
        if not curves.is_file():
            raise CLIError(f"training metrics {curves} not found (give a `dinado train` run directory)")
    _check_output(Path(config["output"]), config["overwrite"])
    model = tokenizer = fmt = None
    if config.get("base"):
        model, tokenizer = load_base(config)
        fmt = prompt_format(decoding, tokenizer, model)
    with fresh_run(config) as run:
        run.write_config(config)
        results: dict[str, dict[str, float]] = {}
        for name, (rows, records) in runs.items():
            prompts = [r["prompt"] for r in rows]
            outputs = [r["completion"] for r in rows]
            results[name] = evaluate_texts(prompts, outputs, oracle, references, model, tokenizer, fmt)
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
    print(f"wrote {run.final / 'report.md'}")


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
    _check_output(output, config["overwrite"])
    try:
        result = pretrain(pretrain_config, output, overwrite=config["overwrite"])
    except KeyboardInterrupt as exc:
        left = "left as it was" if output.exists() else "not created"
        raise Interrupted(
            isinstance(exc, Terminated), f"nothing was written ({output} {left}); run the command again"
        ) from None
    atomic_write_text(output / "config.yaml", yaml.safe_dump(config, sort_keys=True))
    print(  # pretrain() itself prints why it stopped (`pretrain stopped: max_epochs=3 reached ...`)
        f"pretrained {result.num_parameters:,} parameters for {result.steps} steps "
        f"(best held-out loss {result.best_val_loss:.3f} at step {result.best_step}); saved to {output}"
    )


def cmd_demo(config: dict[str, Any]) -> None:
    """The embedded demo: toy language, pretrained base, NADO / DiNADO guides, one table."""
    from .demo import run_demo

    try:
        run_demo(config["output"] or "runs/demo", config["seed"], config["quick"], config["threads"])
    except KeyboardInterrupt as exc:
        raise Interrupted(
            isinstance(exc, Terminated),
            f"{config['output']} keeps what was finished (a completed base is reused); run the command again",
        ) from None


SPECS["demo"] = {
    "output": ("runs/demo", "str", "run directory (the pretrained base is cached there)"),
    "seed": (0, "int", "random seed"),
    "quick": (False, "flag", "a smaller, faster run"),
    "threads": (1, "count", "torch threads (1 is fastest for the demo's small models on 2 cores)"),
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


class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error on one line that says where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dinado", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"dinado {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, spec in SPECS.items():
        p = sub.add_parser(
            name,
            help=COMMANDS[name].__doc__ or name,
            description=f"dinado {name}: flags override the --config file; unknown config keys are an error.",
            epilog=f"example:\n  {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,  # `--num-sample 3` is a typo, not --num-samples
        )
        p.add_argument("--config", help="a YAML file with any of the keys below (flags win)")
        for key, (default, kind, text) in spec.items():
            shown = f"{text} (default: {default})" if default is not None else text
            if kind == "flag":
                p.add_argument(
                    _flag(key), dest=key, action="store_const", const=True, default=None, help=shown
                )
                continue
            parse, what = KINDS[kind]
            if _nullable(name, key) and kind != "mapping":
                parse = _or_none(parse)
            p.add_argument(_flag(key), dest=key, type=parse, default=None, help=shown, metavar=kind.upper())
    return parser


def _or_none(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A flag for a key that may be null also takes `none`."""

    def parse_or_none(text: Any) -> Any:
        return NONE if str(text).strip().lower() in NONE_WORDS else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")
    return parse_or_none


def _unknown_flags(parser: argparse.ArgumentParser, command: str | None, extras: list[str]) -> str:
    flags = [_flag(k) for k in SPECS.get(command, {})] + ["--config"]
    hints = []
    for extra in extras:
        close = difflib.get_close_matches(extra.split("=")[0], flags, n=1) if extra.startswith("--") else []
        hints.append(f"{extra} (did you mean {close[0]}?)" if close else extra)
    return f"unrecognized arguments: {' '.join(hints)}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as exc:  # usage errors (one line, exit 2), --help and --version (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    prog = f"dinado {args.command}"
    if extras:
        print(
            f"{prog}: error: {_unknown_flags(parser, args.command, extras)} (see `{prog} --help`)",
            file=sys.stderr,
        )
        return 2
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        previous = None
    try:
        config = resolve(args.command, args)
        COMMANDS[args.command](config)
    except Interrupted as exc:
        what = "SIGTERM" if exc.terminated else "Ctrl-C"
        print(f"{prog}: interrupted ({what}): {exc}", file=sys.stderr)
        return 143 if exc.terminated else 130
    except KeyboardInterrupt as exc:  # before any output was made
        what, code = ("SIGTERM", 143) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
        print(f"{prog}: interrupted ({what}) before anything was written", file=sys.stderr)
        return code
    except (CLIError, ValueError, FileNotFoundError, OracleError) as exc:
        message = " ".join(str(exc).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
