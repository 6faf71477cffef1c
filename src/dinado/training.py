"""The training loop: minibatches of a SampleSet, AdamW, per-step loss and regulariser in a report."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .guide import Guide
from .objectives import guide_loss
from .samples import SampleSet

# Defaults measured on the exact testbed (see docs/benchmarks.md): they train every variant well there.
DEFAULT_LEARNING_RATES = {"module": 1e-3, "lora": 1e-3}


@dataclass
class TrainReport:
    """What happened, step by step: the loss, its cross-entropy and regulariser parts."""

    variant: str
    steps: int = 0
    learning_rate: float = 0.0
    batch_size: int = 0
    loss: list[float] = field(default_factory=list)
    cross_entropy: list[float] = field(default_factory=list)
    regularizer: list[float] = field(default_factory=list)
    wall_seconds: float = 0.0
    weighted: bool = False
    weight_clip: float | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def default_learning_rate(guide: Guide) -> float:
    return DEFAULT_LEARNING_RATES["lora" if guide.config.uses_lora else "module"]


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled epochs of index batches (the last short batch of an epoch is kept)."""
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n, batch_size):
            yield perm[start : start + batch_size]


def train(
    guide: Guide,
    samples: SampleSet,
    max_steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 64,
    learning_rate: float | None = None,
    seed: int = 0,
    weight_clip: float | None = None,
    use_weights: bool = True,
    micro_batch_size: int | None = None,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 0.0,
    progress: bool = False,
) -> TrainReport:
    """Train ``guide`` on ``samples``; give ``max_steps`` or ``epochs`` (or both: the smaller wins).

    Importance weights (``samples.log_weights``) are self-normalised per prompt group and applied to every
    prefix term of their sequence unless ``use_weights=False``. ``micro_batch_size`` splits each batch for
    memory (large vocabularies): each chunk's mean loss is weighted by its share of the batch.
    """
    if not isinstance(samples, SampleSet):
        raise TypeError(f"samples must be a dinado.SampleSet, got {type(samples).__name__}")
    if max_steps is None and epochs is None:
        raise ValueError("give max_steps or epochs")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    vocab = guide.config.base_vocab_size
    too_big = [i for i, row in enumerate(samples.completions) if max(row) >= vocab]
    too_big += [i for i, row in enumerate(samples.prompts) if max(row) >= vocab]
    if too_big:
        raise ValueError(
            f"sample {too_big[0]} has a token id >= the base vocabulary size {vocab}: "
            "the samples were made with another tokenizer or model"
        )
    steps_per_epoch = math.ceil(len(samples) / batch_size)
    total = min(
        max_steps if max_steps is not None else math.inf,
        math.ceil(epochs * steps_per_epoch) if epochs is not None else math.inf,
    )
    total = int(total)
    lr = default_learning_rate(guide) if learning_rate is None else learning_rate

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    weights = samples.normalized_weights(weight_clip) if use_weights else torch.ones(len(samples))
    params = [p for p in guide.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    device = guide.device
    report = TrainReport(
        variant=guide.config.variant,
        learning_rate=lr,
        batch_size=batch_size,
        weighted=use_weights and samples.log_weights is not None,
        weight_clip=weight_clip,
    )
    guide.train()
    start = time.perf_counter()
    batches = _batches(len(samples), batch_size, generator)
    bar = tqdm(total=total, desc=f"train {guide.config.variant}", disable=not progress)
    for _ in range(total):
        indices = next(batches)
        chunk = micro_batch_size or len(indices)
        optimizer.zero_grad(set_to_none=True)
        loss_sum = ce_sum = reg_sum = 0.0
        for part_start in range(0, len(indices), chunk):
            part = indices[part_start : part_start + chunk]
            batch = samples.collate(part, weights).to(device)
            terms = guide_loss(guide, batch)
            share = len(part) / len(indices)
            (terms.loss * share).backward()
            loss_sum += terms.loss.item() * share
            ce_sum += terms.cross_entropy.item() * share
            reg_sum += terms.regularizer.item() * share
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        report.loss.append(loss_sum)
        report.cross_entropy.append(ce_sum)
        report.regularizer.append(reg_sum)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}")
    bar.close()
    guide.eval()
    report.steps = total
    report.wall_seconds = time.perf_counter() - start
    return report
