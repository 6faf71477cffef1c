"""The training loop: minibatches of a SampleSet, AdamW, per-step loss and regulariser in a report."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ._utils import ADAM_EPSILON, adamw, atomic_directory, clip_and_step, trainable_parameters
from .data import SampleSet
from .features import (
    FeatureCache,
    FeatureCacheError,
    default_memory_budget,
    estimated_bytes,
    precompute_features,
    release_buffers,
    unsupported_reason,
)
from .guide import CONFIG_NAME, WEIGHTS_NAME, Guide, check_same_base
from .objectives import guide_loss, term_counts

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
    stopped_early: bool = False  # should_stop() ended the run before its last step
    cached_features: bool = False  # the steps read a FeatureCache instead of running the base

    def to_dict(self) -> dict:
        return dict(self.__dict__)


CHECKPOINT_PREFIX = "checkpoint-"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step under ``checkpoint_dir``, or None."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    found = [
        (int(p.name[len(CHECKPOINT_PREFIX) :]), p)
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return max(found)[1] if found else None


def _save_checkpoint(
    root: Path, step: int, guide: Guide, optimizer: torch.optim.Optimizer, report: TrainReport
) -> Path:
    """Write guide weights, optimizer state (safetensors) and trainer state (JSON) into a new directory, rename
    it into place, then remove the older checkpoints. A failure part-way leaves the older ones as they were
    and no partial one behind."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    with atomic_directory(final, overwrite=True) as tmp:
        guide.save_pretrained(tmp)
        opt = optimizer.state_dict()
        tensors = {
            f"state.{idx}.{key}": value.detach().cpu().contiguous()
            for idx, slots in opt["state"].items()
            for key, value in slots.items()
        }
        save_file(tensors, str(tmp / OPTIMIZER_NAME))
        state = {
            "step": step,
            "param_groups": opt["param_groups"],
            "report": report.to_dict(),
            "torch_rng_state": torch.get_rng_state().tolist(),
        }
        (tmp / STATE_NAME).write_text(json.dumps(state))
    for old in root.iterdir():
        if old != final and old.is_dir() and old.name.startswith(CHECKPOINT_PREFIX):
            shutil.rmtree(old)
    return final


def _load_checkpoint(path: Path, guide: Guide, optimizer: torch.optim.Optimizer) -> dict:
    """Restore guide weights and optimizer state from ``path``; return the trainer state."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, STATE_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} is incomplete: {name} is missing")
    saved = json.loads((path / CONFIG_NAME).read_text())
    if saved.get("variant") != guide.config.variant:
        raise ValueError(
            f"checkpoint {path} holds a {saved.get('variant')} guide, but a {guide.config.variant} guide "
            "is being trained: resume with the same variant, or use another output directory"
        )
    weights = load_file(str(path / WEIGHTS_NAME))
    own = guide.trainable_state()
    if set(weights) != set(own):
        raise ValueError(f"checkpoint {path} does not match this guide's parameters")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(weights[name].to(param.dtype))
    state = json.loads((path / STATE_NAME).read_text())
    tensors = load_file(str(path / OPTIMIZER_NAME))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, slot = key.split(".", 2)
        slots.setdefault(int(idx), {})[slot] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    torch.set_rng_state(torch.tensor(state["torch_rng_state"], dtype=torch.uint8))
    return state


def check_samples(guide: Guide, samples: SampleSet, allow_base_mismatch: bool = False) -> None:
    """Refuse samples drawn from another base or tokenizer than the guide's (as their metadata records)."""
    if not allow_base_mismatch:
        check_same_base(
            {**samples.metadata, "base_model_name": samples.metadata.get("base_model")},
            guide.config.to_dict(),
            "the sample set",
            guide.config.base_model_name,
        )


# The exact testbed's completion length, where the defaults above were measured; Hard consistency scales its rate
# by this over the samples' mean completion length (measured: docs/results/commongen.md, "DiNADO-Hard's learning
# rate").
HARD_REFERENCE_LENGTH = 6.0


def default_learning_rate(guide: Guide, samples: SampleSet | None = None) -> float:
    """The default learning rate of ``guide``: its kind's rate, and for Hard consistency (DiNADO-Hard; Merge with
    ``consistency="hard"``) that rate times HARD_REFERENCE_LENGTH / the mean completion length of ``samples`` when
    it is longer. A Hard value is the root value times the per-token ratios q/p along the completion (method.md
    §3), so one step moves it about length times as far as it moves one token's ratio."""
    lr = DEFAULT_LEARNING_RATES["lora" if guide.config.uses_lora else "module"]
    if guide.config.consistency == "hard" and samples is not None and len(samples) > 0:
        mean_length = sum(len(c) for c in samples.completions) / len(samples)
        lr *= min(1.0, HARD_REFERENCE_LENGTH / mean_length)
    return lr


def _feature_cache(
    guide: Guide,
    samples: SampleSet,
    option: bool | FeatureCache | None,
    sample_visits: int,
    progress: bool,
) -> FeatureCache | None:
    """The cache ``train`` reads (or None: run the base every step) for ``cache_features=option``."""
    if option is False:
        return None
    if isinstance(option, FeatureCache):
        option.check(guide, samples)
        return option
    if option is not True and option is not None:
        raise TypeError(f"cache_features must be True, False, None or a FeatureCache, got {option!r}")
    reason = unsupported_reason(guide)
    if option is True:
        if reason is not None:
            raise FeatureCacheError(f"cache_features=True: {reason}")
        return precompute_features(guide, samples, progress=progress)
    # automatic: worth it when the run visits every sample at least once on average (the cache costs one base
    # pass per sample, without its LM head), and only within the memory budget
    if reason is not None or sample_visits < len(samples):
        return None
    if estimated_bytes(guide, samples) > default_memory_budget():
        return None
    try:
        return precompute_features(guide, samples, progress=progress)
    except FeatureCacheError as error:
        warnings.warn(f"training without cached features: {error}", stacklevel=3)
        return None


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
    adam_epsilon: float = ADAM_EPSILON,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    allow_base_mismatch: bool = False,
    should_stop: Callable[[], bool] | None = None,
    cache_features: bool | FeatureCache | None = None,
) -> TrainReport:
    """Train ``guide`` on ``samples``; give ``max_steps`` or ``epochs`` (or both: the smaller wins).

    Importance weights (``samples.log_weights``) are self-normalised per prompt group and applied to every
    prefix term of their sequence unless ``use_weights=False``. ``micro_batch_size`` splits each batch for
    memory (large vocabularies); the loss is a mean over the whole batch's prefix terms, so every chunk's sums
    are divided by the batch's term counts and the step is the same for any ``micro_batch_size``.

    ``learning_rate=None`` takes :func:`default_learning_rate`: 1e-3, and for Hard consistency 1e-3 times
    6 / (the samples' mean completion length) when their completions are longer than 6 tokens on average (a
    Hard value is a product over the completion's tokens, so a step moves it in proportion to the length).

    ``adam_epsilon``: AdamW's epsilon. Torch's default (1e-8) makes Adam's first steps sign-like: every parameter
    moves by the full learning rate whatever the size of its gradient, so in a short run the coordinates whose
    gradients are noise move as far as the informative ones (in a fresh LoRA adapter most do: B starts at 0). An
    epsilon near the typical gradient size damps them; the SmolLM2 demo's DiNADO-Merge uses 1e-4 (docs/demo.md).

    ``cache_features``: the module variants (NADO, DiNADO-Soft/-Hard) leave the base frozen, so its hidden
    states can be computed once (:func:`dinado.features.precompute_features`) and every step runs only the
    guide module and, where the loss needs log p, the base's LM head. DiNADO-Merge's adapter leaves the decoder
    layers below its lowest adapted one unchanged: the cache keeps what that layer reads, and every step runs only
    the layers from there up and the LM head at the positions the loss reads (adapt the top layers only, with
    ``lora_target_modules``, to skip most of the base). ``None`` (default) caches when the run
    visits at least as many samples as the set holds and the cache fits in memory
    (:func:`dinado.features.default_memory_budget`); ``True`` always (an error where the guide cannot use a
    cache, e.g. DiNADO-Merge on an encoder-decoder base); ``False`` never; or pass a
    :class:`dinado.features.FeatureCache` (e.g. in bfloat16, or
    on disk). Both paths give the same loss and gradients.

    With ``checkpoint_dir``, the guide, optimizer and trainer state are saved every ``checkpoint_every``
    steps and at the end (only the latest is kept). ``resume=True`` continues from the latest checkpoint there
    and reaches the same weights as an uninterrupted run with the same seed. ``on_step(step, values)`` is
    called after every step with the loss, cross-entropy and regulariser (for loggers).

    Samples drawn from another base or tokenizer than the guide's (as recorded in their metadata) are refused
    with :class:`dinado.guide.BaseMismatchError` unless ``allow_base_mismatch=True``.

    ``should_stop()`` is asked after every step; when it says True, training ends there (a checkpoint of that
    step is saved when ``checkpoint_dir`` is given, so ``resume=True`` later continues exactly) and the
    report has ``stopped_early=True`` and ``steps`` = the steps done. The CLI uses it for Ctrl-C.
    """
    if not isinstance(samples, SampleSet):
        raise TypeError(f"samples must be a dinado.SampleSet, got {type(samples).__name__}")
    if max_steps is None and epochs is None:
        raise ValueError("give max_steps or epochs")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not adam_epsilon > 0:
        raise ValueError(f"adam_epsilon must be positive, got {adam_epsilon}")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    vocab = guide.config.base_vocab_size
    too_big = [i for i, row in enumerate(samples.completions) if max(row) >= vocab]
    too_big += [i for i, row in enumerate(samples.prompts) if max(row) >= vocab]
    if too_big:
        raise ValueError(
            f"sample {too_big[0]} has a token id >= the base vocabulary size {vocab}: "
            "the samples were made with another tokenizer or model"
        )
    from_seq2seq = samples.decoder_start_token_id is not None
    if from_seq2seq != guide.encoder_decoder:
        kind = lambda yes: "an encoder-decoder" if yes else "a decoder-only"
        raise ValueError(
            f"the samples come from {kind(from_seq2seq)} base (metadata decoder_start_token_id="
            f"{samples.decoder_start_token_id}) but the guide's base is {kind(guide.encoder_decoder)} model: "
            "sample with the guide's own base"
        )
    check_samples(guide, samples, allow_base_mismatch)
    steps_per_epoch = math.ceil(len(samples) / batch_size)
    total = min(
        max_steps if max_steps is not None else math.inf,
        math.ceil(epochs * steps_per_epoch) if epochs is not None else math.inf,
    )
    total = int(total)
    lr = default_learning_rate(guide, samples) if learning_rate is None else learning_rate

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    weights = samples.normalized_weights(weight_clip) if use_weights else torch.ones(len(samples))
    params = trainable_parameters(guide)
    # fused: the default's temporaries the size of every parameter made AdamW a tenth of a cached training step
    optimizer = adamw(params, lr, weight_decay, fused=True, eps=adam_epsilon)
    device = guide.device
    report = TrainReport(
        variant=guide.config.variant,
        learning_rate=lr,
        batch_size=batch_size,
        weighted=use_weights and samples.log_weights is not None,
        weight_clip=weight_clip,
    )
    batches = _batches(len(samples), batch_size, generator)
    start = time.perf_counter()
    cache = _feature_cache(guide, samples, cache_features, total * batch_size, progress)
    report.cached_features = cache is not None
    first_step = 0
    if resume:
        checkpoint = latest_checkpoint(checkpoint_dir)
        if checkpoint is not None:
            state = _load_checkpoint(checkpoint, guide, optimizer)
            first_step = int(state["step"])
            for key in ("loss", "cross_entropy", "regularizer"):
                setattr(report, key, list(state["report"][key][:first_step]))
            for _ in range(first_step):  # replay the batch order: same batches as an uninterrupted run
                next(batches)
    guide.train()
    bar = tqdm(
        total=total,
        initial=min(first_step, total),
        desc=f"train {guide.config.variant}",
        disable=not progress,
    )
    try:
        for step in range(first_step, total):
            indices = next(batches)
            chunk = micro_batch_size or len(indices)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = ce_sum = reg_sum = 0.0
            parts = [indices[i : i + chunk] for i in range(0, len(indices), chunk)]
            collated = [samples.collate(part, weights) for part in parts]
            counts = [term_counts(guide, batch) for batch in collated]
            # the whole batch's term counts: each chunk's sums over them add up to the full batch's mean
            normalizer = (sum(c[0] for c in counts), sum(c[1] for c in counts))
            for part, batch in zip(parts, collated, strict=True):
                if cache is not None:
                    batch.base_hidden = cache.batch_hidden(part, batch.input_ids.shape[1])
                    if cache.metadata["last_hidden"]:
                        batch.base_last_hidden = cache.batch_hidden(part, batch.input_ids.shape[1], last=True)
                terms = guide_loss(guide, batch.to(device), normalizer=normalizer)
                terms.loss.backward()
                loss_sum += terms.loss.item()
                ce_sum += terms.cross_entropy.item()
                reg_sum += terms.regularizer.item()
            clip_and_step(optimizer, params, max_grad_norm)
            report.loss.append(loss_sum)
            report.cross_entropy.append(ce_sum)
            report.regularizer.append(reg_sum)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}")
            if on_step is not None:
                on_step(step + 1, {"loss": loss_sum, "cross_entropy": ce_sum, "regularizer": reg_sum})
            done = step + 1
            stop = should_stop is not None and done < total and should_stop()
            if checkpoint_dir is not None and (
                stop or done == total or (checkpoint_every is not None and done % checkpoint_every == 0)
            ):
                report.steps = done
                _save_checkpoint(Path(checkpoint_dir), done, guide, optimizer, report)
            if stop:
                report.stopped_early = True
                total = done
                break
    finally:
        bar.close()
        release_buffers()
    guide.eval()
    report.steps = total
    report.wall_seconds = time.perf_counter() - start
    return report
