"""The training loop of :func:`pretrain`: read and tokenize the data, build the model, step with AdamW under a
warm-up and decay schedule, evaluate on the held-out rows (early stopping keeps the best weights), and save
everything into a directory renamed into place at the end."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._utils import (
    LRSchedule,
    adamw,
    atomic_directory,
    backward_step,
    causal_lm_loss,
    check_output_dir,
    trainable_parameters,
)
from .config import PretrainConfig
from .data import _load_examples, _Rows, _rows, _Seq2SeqRows, _train_tokenizer
from .model import _build_model

__all__ = ["CONFIG_FILE", "METRICS_FILE", "PretrainResult", "pretrain"]

logger = logging.getLogger(__package__)  # "dinado.pretrain"

METRICS_FILE = "pretrain_metrics.jsonl"
CONFIG_FILE = "pretrain_config.json"


@dataclass
class PretrainResult:
    """What :func:`pretrain` did. Losses are mean cross-entropies per predicted token, in nats."""

    output_dir: str
    train_loss: list[float] = field(default_factory=list)  # one per optimisation step
    val_loss: list[float] = field(default_factory=list)  # one per evaluation
    eval_steps: list[int] = field(default_factory=list)  # the step of each evaluation (0 = before training)
    best_val_loss: float = math.inf
    best_step: int = 0
    steps: int = 0
    stopped_early: bool = False
    stop_reason: str = ""  # why training ended: which limit was reached, or early stopping
    wall_seconds: float = 0.0
    num_parameters: int = 0  # trainable parameters (tied embeddings counted once)
    num_train_examples: int = 0
    num_val_examples: int = 0
    truncated_examples: int = 0  # training + validation examples cut at `context` tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Losses


def _seq2seq_batch_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=batch["decoder_input_ids"],
        decoder_attention_mask=batch["decoder_attention_mask"],
        use_cache=False,
    ).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        batch["labels"].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


def _rows_loss(
    model, rows: _Rows | _Seq2SeqRows, index, device: torch.device, reduction: str = "mean"
) -> tuple[torch.Tensor, int]:
    """The loss on ``rows[index]`` and the number of target tokens it is taken over."""
    if isinstance(rows, _Seq2SeqRows):
        batch = {k: v.to(device) for k, v in rows.batch(index).items()}
        return _seq2seq_batch_loss(model, batch, reduction), int((batch["labels"] != -100).sum())
    ids, mask, labels = (t.to(device) for t in rows.batch(index))
    return causal_lm_loss(model, ids, mask, labels, reduction), int((labels[:, 1:] != -100).sum())


@torch.no_grad()
def _evaluate(model, rows: _Rows | _Seq2SeqRows, batch_size: int, device: torch.device) -> float:
    """Mean cross-entropy per target token over ``rows``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        index = range(start, min(start + batch_size, len(rows)))
        loss, n = _rows_loss(model, rows, index, device, reduction="sum")
        total += loss.item()
        count += n
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------------------
# One run


def _prepare(config: PretrainConfig, generator: torch.Generator):
    """The training and validation examples (split with ``generator``), the tokenizer trained on the training
    ones, and both as rows."""
    train_examples, val_examples = _load_examples(config, generator)
    tokenizer = _train_tokenizer(config, train_examples)
    train_rows, val_rows = _rows(config, train_examples, tokenizer), _rows(config, val_examples, tokenizer)
    for name, rows in (("training", train_rows), ("validation", val_rows)):
        if len(rows) == 0:
            raise ValueError(
                f"no {name} rows left after tokenization: every example's prompt fills the context ({config.context} tokens)"
            )
    return train_examples, val_examples, tokenizer, train_rows, val_rows


def _steps(config: PretrainConfig, num_rows: int) -> tuple[int, int]:
    """Steps per epoch, and the steps to take: ``max_steps`` or ``max_epochs``, whichever comes first (>= 1)."""
    steps_per_epoch = math.ceil(num_rows / config.batch_size)
    total = min(
        config.max_steps if config.max_steps is not None else math.inf,
        math.ceil(config.max_epochs * steps_per_epoch) if config.max_epochs is not None else math.inf,
    )
    return steps_per_epoch, max(1, int(total))


@dataclass
class _Run:
    """What the steps and the evaluations of one run share."""

    config: PretrainConfig
    model: Any
    train_rows: _Rows | _Seq2SeqRows
    val_rows: _Rows | _Seq2SeqRows
    device: torch.device
    result: PretrainResult
    steps_per_epoch: int
    total: int
    start_time: float
    metrics: TextIO  # one JSON line per evaluation
    bar: Any  # the progress bar
    params: list[torch.nn.Parameter] = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    schedule: LRSchedule = field(init=False)
    best_state: dict[str, torch.Tensor] | None = None  # the weights of the best evaluation, on the CPU
    bad_evals: int = 0  # evaluations in a row without improvement

    def __post_init__(self) -> None:
        config = self.config
        self.params = trainable_parameters(self.model)  # Marian's sinusoidal positions are fixed
        self.optimizer = adamw(self.params, config.learning_rate, config.weight_decay, matrices_only=True)
        self.schedule = LRSchedule.from_fraction(
            config.learning_rate, self.total, config.warmup_fraction, config.lr_schedule
        )


def _evaluation(run: _Run, step: int) -> bool:
    """Evaluate after ``step`` steps, log it, keep the best weights; True when patience has run out."""
    config, result = run.config, run.result
    val = _evaluate(run.model, run.val_rows, config.batch_size, run.device)
    if val < result.best_val_loss - config.min_delta:
        result.best_val_loss, result.best_step = val, step
        run.best_state = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        run.bad_evals = 0
    else:
        run.bad_evals += 1
    result.val_loss.append(val)
    result.eval_steps.append(step)
    recent = result.train_loss[-config.eval_every :] if step else []
    record = {
        "step": step,
        "epoch": step / run.steps_per_epoch,
        "train_loss": sum(recent) / len(recent) if recent else None,
        "val_loss": val,
        "best_val_loss": result.best_val_loss,
        "best_step": result.best_step,
        "learning_rate": run.optimizer.param_groups[0]["lr"] if step else None,
        "elapsed_seconds": time.perf_counter() - run.start_time,
    }
    run.metrics.write(json.dumps(record) + "\n")
    run.metrics.flush()
    run.bar.set_postfix(
        loss=f"{result.train_loss[-1]:.3f}" if step else "-",
        val=f"{val:.3f}",
        best=f"{result.best_val_loss:.3f}",
    )
    return config.patience is not None and run.bad_evals >= config.patience


def _train(run: _Run, generator: torch.Generator) -> tuple[int, bool]:
    """Evaluate, then take shuffled batches (order from ``generator``) until ``run.total`` steps or early
    stopping, evaluating every ``eval_every`` steps and after the last; return the steps taken and whether
    patience ran out."""
    config, rows = run.config, run.train_rows
    stop = _evaluation(run, 0)
    step = 0
    while step < run.total and not stop:
        perm = torch.randperm(len(rows), generator=generator)
        for start in range(0, len(rows), config.batch_size):
            if step >= run.total or stop:
                break
            run.schedule.apply(run.optimizer, step)
            loss, _ = _rows_loss(run.model, rows, perm[start : start + config.batch_size], run.device)
            backward_step(run.optimizer, loss, run.params, config.grad_clip)
            step += 1
            run.result.train_loss.append(loss.item())
            run.bar.update(1)
            if step % config.eval_every == 0 or step == run.total:
                stop = _evaluation(run, step)
            elif step % 10 == 0:
                run.bar.set_postfix(loss=f"{loss.item():.3f}", best=f"{run.result.best_val_loss:.3f}")
    return step, stop


def _stop_reason(config: PretrainConfig, result: PretrainResult, steps_per_epoch: int) -> str:
    """Why training ended after ``result.steps`` steps, in words (early stopping, max_steps or max_epochs)."""
    if result.stopped_early:
        n = config.patience
        return (
            f"early stopping: no held-out improvement for {n} evaluation{'s' if n != 1 else ''} "
            f"(best at step {result.best_step})"
        )
    epoch_steps = math.inf if config.max_epochs is None else math.ceil(config.max_epochs * steps_per_epoch)
    if config.max_steps is not None and config.max_steps <= epoch_steps:
        return f"max_steps={config.max_steps} reached"
    reason = f"max_epochs={config.max_epochs:g} reached at step {result.steps}"
    if config.max_steps is not None:
        reason += (
            f", before max_steps={config.max_steps} "
            "(raise --max-epochs or set it to none to train for --max-steps)"
        )
    return reason


def _finish(run: _Run, step: int, stop: bool, progress: bool) -> None:
    """Record how the run ended, and say it."""
    result = run.result
    result.steps = step
    result.stopped_early = stop and step < run.total
    result.stop_reason = _stop_reason(run.config, result, run.steps_per_epoch)
    logger.info("pretrain stopped: %s", result.stop_reason)
    if progress:
        tqdm.write(f"pretrain stopped: {result.stop_reason}", file=sys.stderr)


def _save(run: _Run, tokenizer, directory: Path) -> None:
    """The best weights, the tokenizer and the config into ``directory``."""
    if run.best_state is None:
        raise FloatingPointError(
            f"the validation loss was never finite ({run.result.val_loss}); nothing to save"
        )
    run.model.load_state_dict(run.best_state)
    run.model.eval()
    run.model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with open(directory / CONFIG_FILE, "w", encoding="utf-8") as f:
        json.dump(run.config.to_dict(), f, indent=2)
        f.write("\n")


def pretrain(
    config: PretrainConfig,
    output_dir: str | os.PathLike,
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device = "cpu",
) -> PretrainResult:
    """Train a tokenizer and a GPT-2 or Marian model as ``config`` says; save the best weights to
    ``output_dir``.

    ``output_dir`` ends up holding ``config.json``, ``generation_config.json``, ``model.safetensors``,
    ``tokenizer.json``, ``tokenizer_config.json``, ``pretrain_config.json`` and ``pretrain_metrics.jsonl``
    (one JSON line per evaluation). Everything is built in a hidden sibling directory and renamed into place
    at the end, so a failed or interrupted run leaves no partial model behind. An existing non-empty
    ``output_dir`` is refused unless ``overwrite=True``.
    """
    if not isinstance(config, PretrainConfig):
        raise TypeError(f"config must be a PretrainConfig, got {type(config).__name__}")
    config.validate()
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)  # fail before any work
    device = torch.device(device)
    start_time = time.perf_counter()

    generator = torch.Generator().manual_seed(config.seed)  # the split, then the batch order
    train_examples, val_examples, tokenizer, train_rows, val_rows = _prepare(config, generator)
    torch.manual_seed(config.seed)
    model = _build_model(config, tokenizer).to(device)
    model.train()
    result = PretrainResult(
        output_dir=os.fspath(output_dir),
        num_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        num_train_examples=len(train_examples),
        num_val_examples=len(val_examples),
        truncated_examples=train_rows.truncated + val_rows.truncated,
    )
    steps_per_epoch, total = _steps(config, len(train_rows))
    with atomic_directory(output_dir, overwrite) as tmp:
        with (
            open(tmp / METRICS_FILE, "w", encoding="utf-8") as metrics,
            tqdm(total=total, desc="pretrain", disable=not progress) as bar,
        ):
            run = _Run(
                config=config,
                model=model,
                train_rows=train_rows,
                val_rows=val_rows,
                device=device,
                result=result,
                steps_per_epoch=steps_per_epoch,
                total=total,
                start_time=start_time,
                metrics=metrics,
                bar=bar,
            )
            step, stop = _train(run, generator)
        _finish(run, step, stop, progress)
        _save(run, tokenizer, tmp)
        result.wall_seconds = time.perf_counter() - start_time
    return result
