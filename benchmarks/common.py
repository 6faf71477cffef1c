"""What every benchmark script shares: progress logging, markdown tables, stage timers and the two effective
sample sizes (pooled over a whole sample set, or the mean over its prompt groups), named apart.

Scripts are run by path; each puts the repository root on ``sys.path`` before importing this module.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch


def logger(prefix: str | None = None, to: str = "stderr") -> Callable[[str], None]:
    """A progress printer: ``[prefix] message``, flushed at once, to ``sys.stderr`` or ``sys.stdout`` (``to``),
    looked up at each call (so a test's captured stream is the one written)."""

    def log(message: str) -> None:
        print(f"[{prefix}] {message}" if prefix else message, file=getattr(sys, to), flush=True)

    return log


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


class Timer:
    """Wall time of named stages: ``with timer.stage("train"): ...``; ``timer.seconds`` maps name -> seconds."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.seconds: dict[str, float] = {}
        self.log = log

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.log(f"{name} ...")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.log(f"{name}: {self.seconds[name]:.1f} s")


def pooled_ess(samples) -> float:
    """Effective sample size of a whole SampleSet's weights, (sum w)^2 / sum w^2 (all w = 1: its size)."""
    w = samples.normalized_weights().double()
    return float(w.sum() ** 2 / (w**2).sum())


def mean_group_ess(samples) -> float:
    """Mean over the prompt groups (``SampleSet.group_ids``) of each group's (sum w)^2 / sum w^2."""
    w = samples.normalized_weights().double()
    groups = samples.group_ids()
    count = int(groups.max()) + 1
    s1 = torch.zeros(count, dtype=torch.float64).index_add_(0, groups, w)
    s2 = torch.zeros(count, dtype=torch.float64).index_add_(0, groups, w * w)
    return float((s1 * s1 / s2).mean())
