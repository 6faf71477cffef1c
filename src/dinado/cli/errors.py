"""How a command ends early: a user error (one line, exit 2) or an interruption (exit 130 / 143)."""

from __future__ import annotations

import os
import signal
import threading


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


def in_finalizer(frame) -> bool:
    """Whether ``frame`` or a caller of it runs a ``__del__``: an exception raised there is printed as
    "Exception ignored" and lost (a garbage collection can run one at any allocation: measured on CI, a Ctrl-C
    landing in the ``regex`` module's ``Group.__del__`` at the start of sampling was swallowed and the run went
    on to the end)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def raise_interrupt(signum, frame) -> None:
    """The CLI's handler of Ctrl-C and SIGTERM: KeyboardInterrupt (or :class:`Terminated`) in the main thread, as
    Python's own handler does, except inside a finalizer, where it would be lost: there the signal is sent again
    10 ms later, to land once the finalizer has returned."""
    if in_finalizer(frame):
        threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
