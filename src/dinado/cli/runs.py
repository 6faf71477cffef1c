"""Run directories: `train` works in its own (resumable); every other command builds one under a hidden name and
renames it into place at the end, so an error or an interruption leaves nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .._utils import atomic_directory, atomic_write_text
from .errors import CLIError, interrupted


class Run:
    """A run directory: ``path`` is where files go now, ``final`` where the run ends up."""

    def __init__(self, path: Path, final: Path) -> None:
        self.path, self.final = path, final

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=True))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def check_output(
    path: Path, overwrite: bool, hint: str = "choose a new --output or pass --overwrite"
) -> None:
    if path.exists() and not path.is_dir():
        raise CLIError(f"output {path} exists and is not a directory: choose another --output")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CLIError(f"output directory {path} is not empty: {hint}")


def nothing_written(output: Path) -> str:
    """What an interruption leaves of a command that writes its output only at the end."""
    left = "left as it was" if output.exists() else "not created"
    return f"nothing was written ({output} {left}); run the command again"


@contextmanager
def fresh_run(config: dict[str, Any]) -> Iterator[Run]:
    """A run directory built under a hidden temporary name and renamed into place when the command succeeds:
    an error, Ctrl-C or SIGTERM leaves nothing at --output (and an existing one untouched)."""
    final = Path(config["output"])
    overwrite = bool(config.get("overwrite"))
    check_output(final, overwrite)
    try:
        with atomic_directory(final, overwrite=overwrite) as tmp:
            yield Run(tmp, final)
    except KeyboardInterrupt as exc:
        raise interrupted(exc, nothing_written(final)) from None
