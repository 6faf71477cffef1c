"""How a command ends early: a user error (one line, exit 2) or an interruption (exit 130 / 143)."""

from __future__ import annotations


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so every cleanup runs."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM; the message says what is left on disk."""

    def __init__(self, terminated: bool, note: str) -> None:
        super().__init__(note)
        self.terminated = terminated


def interrupted(exc: KeyboardInterrupt, note: str) -> Interrupted:
    """The Interrupted to raise for ``exc`` (Ctrl-C, or SIGTERM as :class:`Terminated`)."""
    return Interrupted(isinstance(exc, Terminated), note)


def raise_terminated(signum, frame) -> None:
    raise Terminated()
