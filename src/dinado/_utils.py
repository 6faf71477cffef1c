"""Small file helpers: atomic writes with the modes plain open() and mkdir() give, and temporary run directories."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_MARK = ".partial-"


_PROC_STATUS = "/proc/self/status"


def current_umask() -> int:
    """The process's umask, read afresh on every call (a test or a caller may change it at any time).

    Linux shows it in ``/proc/self/status`` (``Umask:``); elsewhere it is read with :func:`os.umask`, which can
    only read it by setting it, so it is set to the restrictive 0o077 for that instant and put back.
    """
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode a new file made with plain ``open(path, "w")`` gets now: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def plain_dir_mode() -> int:
    """The mode a new directory made with plain ``mkdir()`` gets now: 0o777 less the umask."""
    return 0o777 & ~current_umask()


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write ``path`` all at once: yield a new, uniquely named temporary path beside it for the caller to
    write (with ``save_file``, ``savefig``, ``open`` ...), then give that file the mode a plain ``open()``
    would (0o666 less the umask; :func:`tempfile.mkstemp` makes it 0o600) and rename it over ``path``.

    The temporary is hidden (``.<name>.<random>.tmp<suffix>``, keeping the suffix for writers that pick
    a format by it) and made with ``O_EXCL``, so concurrent writers never share one. On any exception,
    KeyboardInterrupt included, it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, plain_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text (UTF-8) to ``path`` atomically, with a plain file's mode (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def make_temp_dir(path: str | os.PathLike, tag: str = "tmp") -> Path:
    """Make a new, uniquely named, empty hidden directory beside ``path`` (``.<name>.<tag>-<random>``) to build
    a directory in before renaming it onto ``path``. It gets the mode a plain ``mkdir()`` would give
    (0o777 less the umask; :func:`tempfile.mkdtemp` makes it 0o700), so the renamed result has it too. The
    caller removes it on failure.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{tag}-"))
    try:
        os.chmod(tmp, (stat.S_IMODE(os.stat(tmp).st_mode) & ~0o777) | plain_dir_mode())  # keeps a setgid bit
    except BaseException:
        tmp.rmdir()
        raise
    return tmp


def set_plain_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and every directory and regular file under it the mode a plain ``mkdir()`` / ``open()``
    would give now, before a directory built by other writers is renamed into place: safetensors (behind
    ``save_pretrained`` of Hugging Face models) writes its files 0o600 whatever the umask. Set-user/group-id
    and sticky bits are kept; symbolic links are left alone.
    """
    file_mode, dir_mode = plain_file_mode(), plain_dir_mode()
    for where, _, files in os.walk(root):
        for name, mode in [(where, dir_mode)] + [(os.path.join(where, f), file_mode) for f in files]:
            st = os.lstat(name)
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                os.chmod(name, (stat.S_IMODE(st.st_mode) & ~0o777) | mode)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(path: str | os.PathLike) -> None:
    """Remove ``.<name>.partial-<pid>`` directories beside ``path`` left by processes that no longer run
    (a run killed with SIGKILL cannot clean up after itself)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}{PARTIAL_MARK}"
    for old in path.parent.iterdir():
        pid = old.name[len(prefix) :]
        if old.name.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory under a hidden temporary name beside ``path`` and rename it into place at the end.

    On any exception (Ctrl-C and SIGTERM included) the temporary directory is removed, so ``path`` either
    holds a complete result or is left as it was; after SIGKILL only the hidden ``.<name>.partial-<pid>``
    remains, and the next call for the same ``path`` removes it. ``overwrite=True`` replaces an existing
    ``path`` only once the new directory is complete.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} is not empty")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()  # mkdir's mode (0777 less the umask), unlike mkdtemp's 0700
    try:
        yield tmp
        set_plain_modes(tmp)  # what other writers made (safetensors writes 0600) gets open()'s mode
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
