"""What commands read: required keys, the base and the guide, prompts files, prompt formats, oracles, generations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..guide import BaseMismatchError, Guide
from ..hf import check_length, is_encoder_decoder, load_model
from ..oracles import KeywordList, KeywordOracle, as_token_oracle, oracle_from_config
from ..text import PromptFormat
from .errors import CLIError
from .specs import flag


def require(config: dict[str, Any], *keys: str) -> None:
    for key in keys:
        if config.get(key) in (None, ""):
            raise CLIError(f"{flag(key)} is required (or set `{key}:` in the config file)")


def load_base(config: dict[str, Any]):
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


def load_guide(config: dict[str, Any], base, tokenizer) -> Guide:
    path = Path(config["guide"])
    if (path / "guide" / "dinado_config.json").is_file() and not (path / "dinado_config.json").is_file():
        raise CLIError(f"{path} is a `dinado train` run directory: pass its guide, --guide {path / 'guide'}")
    try:
        return Guide.from_pretrained(
            path, base, tokenizer=tokenizer, allow_base_mismatch=bool(config.get("allow_base_mismatch"))
        )
    except (FileNotFoundError, BaseMismatchError) as exc:
        raise CLIError(str(exc)) from None
    except ValueError as exc:
        raise CLIError(f"guide and base do not match: {exc}") from None


def samples_path(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "samples.safetensors"
    if not p.is_file():
        raise CLIError(
            f"samples file {p} not found (give a .safetensors file or a `dinado sample` run directory)"
        )
    return p


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


def check_prompt_lengths(
    model, rows: list[list[int]], max_new_tokens: int, file: str, lines: list[int]
) -> None:
    """Name the first prompt line that, with --max-new-tokens, runs past the model's positions."""
    for row, line in zip(rows, lines, strict=True):
        try:
            check_length(model, len(row), max_new_tokens)
        except ValueError as exc:
            raise CLIError(f"{file} line {line}: {exc}") from None


def prompt_format(config: dict[str, Any], tokenizer, model=None) -> PromptFormat:
    """The PromptFormat of --prompt-template and --chat (auto: chat when the tokenizer has a template)."""
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
