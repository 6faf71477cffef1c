"""Plain helpers (no dinado imports): the one way to write a file (atomic_file) and the one way to write a
directory (atomic_directory) all at once, with the modes plain open() and mkdir() give; and the pieces every
training loop shares (AdamW, the learning-rate schedule, gradient clipping, the causal LM loss)."""

from __future__ import annotations

import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

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


# ---------------------------------------------------------------------------------------------------------
# Directories built beside their place and renamed into it


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse an ``output_dir`` that is a file, or a non-empty directory unless ``overwrite``."""
    if output_dir.exists() or output_dir.is_symlink():
        if not output_dir.is_dir():
            raise FileExistsError(f"output_dir {os.fspath(output_dir)!r} exists and is not a directory")
        if any(output_dir.iterdir()) and not overwrite:
            raise FileExistsError(
                f"output_dir {os.fspath(output_dir)!r} exists and is not empty; "
                "choose another directory or pass overwrite=True to replace it"
            )


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of ``path``; return the ones created (deepest first)."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for p in reversed(created):
        p.mkdir()
    return created


def _discard_partial(tmp: Path, created_parents: list[Path]) -> None:
    """After a failure: remove the half-built directory and the parents made for it (while still empty)."""
    shutil.rmtree(tmp, ignore_errors=True)
    for p in created_parents:  # deepest first
        try:
            p.rmdir()
        except OSError:
            break


def _move_into_place(tmp: Path, output_dir: Path, overwrite: bool) -> None:
    check_output_dir(output_dir, overwrite)
    old = None
    if output_dir.exists():
        if any(output_dir.iterdir()):
            old = make_temp_dir(output_dir, "old")
            os.replace(output_dir, old / "dir")
        else:
            output_dir.rmdir()
    os.replace(tmp, output_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Build the directory ``path`` all at once: the one way dinado writes a directory (CLI runs, pretrained
    bases, classifiers, training checkpoints; single files go through :func:`atomic_file`).

    Yields a hidden sibling ``.<name>.partial-<pid>`` (a plain ``mkdir()``'s mode) to build in; at the end gives
    what other writers made there plain modes (:func:`set_plain_modes`: safetensors writes 0o600) and renames it
    onto ``path`` (checked again with :func:`check_output_dir`; an old non-empty ``path`` is replaced only now,
    and only with ``overwrite``). On any exception, Ctrl-C and SIGTERM included, the partial directory and the
    parents created for it are removed and an old ``path`` is left as it was; after SIGKILL only the partial
    directory remains, and the next call for the same ``path`` removes it (its process is gone).
    """
    path = Path(path)
    check_output_dir(path, overwrite)
    created_parents = _make_parents(path)
    remove_stale_partials(path)
    tmp = path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()  # mkdir's mode (0o777 less the umask), unlike mkdtemp's 0o700
        yield tmp
        set_plain_modes(tmp)
        _move_into_place(tmp, path, overwrite)
    except BaseException:
        _discard_partial(tmp, created_parents)
        raise


# ---------------------------------------------------------------------------------------------------------
# Training loops (guide training, pretrain, the classifier, supervised fine-tuning): AdamW, a warm-up and
# decay schedule of the learning rate, gradient clipping


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of ``module`` that require a gradient, in ``parameters()`` order."""
    return [p for p in module.parameters() if p.requires_grad]


ADAM_EPSILON = 1e-8  # torch's AdamW default; dinado.train's default (the demo's short Merge run uses 1e-4)


def adamw(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    *,
    matrices_only: bool = False,
    fused: bool = False,
    eps: float = ADAM_EPSILON,
) -> torch.optim.AdamW:
    """AdamW over ``params`` with learning rate ``lr``.

    ``matrices_only``: weight decay on the parameters of two or more dimensions only (two groups: the matrices
    with ``weight_decay``, then the biases, norms and other vectors with 0); otherwise one group, every
    parameter decayed by ``weight_decay``. ``fused``: one fused kernel per step where torch has one for the
    parameters (CPU and CUDA), else torch's default implementation: the same update up to rounding, without the
    default's temporaries the size of every parameter (on CPU about 10x faster for a vocabulary-sized head).
    ``eps``: AdamW's epsilon (torch's default 1e-8).
    """
    params = list(params)
    groups: list[torch.nn.Parameter] | list[dict[str, Any]] = params
    kwargs: dict[str, Any] = {"lr": lr, "eps": eps}
    if matrices_only:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    else:
        kwargs["weight_decay"] = weight_decay
    if fused:
        try:
            return torch.optim.AdamW(groups, **kwargs, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(groups, **kwargs)


DECAYS = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of each optimisation step of ``total``: ``lr`` times :meth:`factor`.

    A linear warm-up over the first ``warmup`` steps (step ``s`` < ``warmup`` gets ``(s + 1) / (warmup + 1)``),
    then ``decay`` from 1 at step ``warmup`` towards 0 at step ``total``: ``"cosine"`` (half a cosine period),
    ``"linear"``, or ``"constant"`` (none).
    """

    lr: float
    total: int
    warmup: int = 0
    decay: str = "constant"

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {self.decay!r}")

    @classmethod
    def from_fraction(cls, lr: float, total: int, warmup_fraction: float, decay: str) -> LRSchedule:
        """Warm up over ``int(warmup_fraction * total)`` steps."""
        return cls(lr, total, int(warmup_fraction * total), decay)

    def factor(self, step: int) -> float:
        """The multiplier of ``lr`` at optimisation step ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        if self.decay == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.decay == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Set every parameter group's learning rate for step ``step``."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr * self.factor(step)


def clip_and_step(
    optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float | None
) -> None:
    """Clip the gradients of ``params`` to a total norm of ``max_grad_norm`` (None: no clipping), then step."""
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()


def backward_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    params: list[torch.nn.Parameter],
    max_grad_norm: float | None,
) -> None:
    """One optimisation step on ``loss``: clear the gradients, back-propagate, then :func:`clip_and_step`."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_and_step(optimizer, params, max_grad_norm)


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM: the logits at position t against ``labels[:, t + 1]``
    (-100: no loss), in float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )
