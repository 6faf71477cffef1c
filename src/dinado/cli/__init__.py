"""The `dinado` command: thin subcommands over the Python API, each reading a YAML config plus flags.

Every subcommand writes a run directory: the resolved config (config.yaml), a metrics JSONL and its outputs.
Bad input ends with one line on stderr naming the problem and exit code 2, and leaves nothing half-written.
Ctrl-C (SIGINT) and SIGTERM end with one line and exit 130 / 143: `train` stops after the current step and
keeps a checkpoint for `--resume`; every other subcommand builds its run directory under a hidden temporary
name and renames it into place at the end, so an interrupted run leaves nothing behind. docs/errors.md lists
every kind of bad input, its message and what is left on disk.

Modules: values (one parser per kind of value), specs (each subcommand's keys, generated from GuideConfig,
dinado.train and PretrainConfig where the API declares them), parser (defaults < YAML < flags), inputs (what
commands read), runs (run directories), train and commands (the subcommands).
"""

from __future__ import annotations

import signal
import sys

from ..oracles import OracleError
from .commands import COMMANDS
from .errors import CLIError, Interrupted, Terminated, raise_interrupt
from .parser import build_parser, resolve, unknown_flags
from .specs import SPECS
from .values import KINDS

__all__ = ["COMMANDS", "KINDS", "SPECS", "CLIError", "build_parser", "main", "resolve"]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as exc:  # usage errors (one line, exit 2), --help and --version (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    prog = f"dinado {args.command}"
    if extras:
        print(f"{prog}: error: {unknown_flags(args.command, extras)} (see `{prog} --help`)", file=sys.stderr)
        return 2
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if signum == signal.SIGINT and signal.getsignal(signum) is not signal.default_int_handler:
            continue  # Ctrl-C ignored (a background job) or handled by the caller: leave it so
        try:
            previous[signum] = signal.signal(signum, raise_interrupt)
        except ValueError:  # not the main thread
            break
    try:
        COMMANDS[args.command](resolve(args.command, args))
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
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0
