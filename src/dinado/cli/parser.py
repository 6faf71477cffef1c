"""From argv and a YAML file to one config dict: defaults < --config file < flags, all against SPECS."""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path
from typing import Any

import yaml

from .._version import __version__
from .commands import COMMANDS
from .errors import CLIError
from .specs import SPECS, flag, nullable
from .values import KINDS, LIST_KINDS, NONE, or_none

DESCRIPTION = (
    "The `dinado` command: thin subcommands over the Python API, each reading a YAML config plus flags."
)
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


def coerce_config_value(command: str, key: str, value: Any, file: Path) -> Any:
    """A config-file value through the same parser as its flag: `learning_rate: 1e-3` (a string to PyYAML)
    becomes 0.001, `max_steps: 5.7` is refused as `--max-steps 5.7` is."""
    _, kind, _ = SPECS[command][key]
    where = f"`{key}:` in {file}"
    expected = f"expected {KINDS[kind][1]}, as for {flag(key)}"
    if value is None:
        if nullable(command, key):
            return None
        raise CLIError(f"{where} is empty: give {KINDS[kind][1]} (as for {flag(key)}) or remove the key")
    if kind == "mapping":
        return value
    if (key == "keywords" or kind in LIST_KINDS) and isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            value = ",".join(value)  # a list of words or names: as its flag takes them
    if isinstance(value, (list, dict)) or (isinstance(value, bool) and kind not in ("bool", "flag")):
        shown = str(value).lower() if isinstance(value, bool) else json.dumps(value)
        raise CLIError(f"{where} is {shown}: {expected}")
    if isinstance(value, float) and kind in ("int", "count"):
        raise CLIError(f"{where} is {value!r}: {expected}")
    try:
        return KINDS[kind][0](value)
    except argparse.ArgumentTypeError as exc:
        raise CLIError(f"{where}: {exc} (as for {flag(key)})") from None


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


class _Parser(argparse.ArgumentParser):
    """argparse, with every usage error on one line that says where to look."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dinado", description=DESCRIPTION, allow_abbrev=False)
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
            shown = (f"{text} (default: {default})" if default is not None else text).replace("%", "%%")
            if kind == "flag":
                p.add_argument(
                    flag(key), dest=key, action="store_const", const=True, default=None, help=shown
                )
                continue
            parse = KINDS[kind][0]
            if nullable(name, key) and kind != "mapping":
                parse = or_none(parse)
            p.add_argument(flag(key), dest=key, type=parse, default=None, help=shown, metavar=kind.upper())
    return parser


def unknown_flags(command: str | None, extras: list[str]) -> str:
    flags = [flag(k) for k in SPECS.get(command, {})] + ["--config"]
    hints = []
    for extra in extras:
        close = difflib.get_close_matches(extra.split("=")[0], flags, n=1) if extra.startswith("--") else []
        hints.append(f"{extra} (did you mean {close[0]}?)" if close else extra)
    return f"unrecognized arguments: {' '.join(hints)}"
