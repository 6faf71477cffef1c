"""`dinado train`: a guide trained in its own run directory, resumable; the first Ctrl-C or SIGTERM stops after
the current step with a checkpoint, a second one at once."""

from __future__ import annotations

import json
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .._utils import atomic_write_text
from ..data import SampleSet
from ..guide import Guide
from ..oracles import call_oracle
from ..text import generate_texts
from ..training import CHECKPOINT_PREFIX, TrainReport, check_samples, latest_checkpoint, train
from .errors import CLIError, Interrupted, interrupted, raise_interrupt
from .inputs import load_base, prompt_format, read_prompts, require, samples_path, text_oracle
from .runs import Run, check_output
from .specs import GUIDE_SPEC, TRAIN_SPEC

# Imports stay at the top of the CLI's modules: `import dinado` already loads torch and transformers, so a lazy
# import would not make `dinado --help` faster. Only two are lazy, in this module: wandb (an optional package) and
# torch.utils.tensorboard (a slow import that only `train` needs).

# the guide module's head options: dinado-merge has no module, so `train` leaves them out for it (the default
# pointer=True would be refused there; the others were always ignored)
MODULE_HEAD_OPTIONS = ("head", "head_rank", "read_tokens", "pointer")


def guide_options(config: dict[str, Any]) -> dict[str, Any]:
    """The Guide.create options (GuideConfig fields) of a resolved `train` config."""
    skip = {"variant", *(MODULE_HEAD_OPTIONS if config["variant"] == "dinado-merge" else ())}
    return {name: config[name] for name in GUIDE_SPEC if name not in skip}


def cmd_train(config: dict[str, Any]) -> None:
    """Train a guide (NADO or DiNADO) on labelled samples; checkpoints, resume, metrics, TensorBoard."""
    require(config, "output", "base", "samples")
    samples = _load_samples(config)
    output = Path(config["output"])
    if not config["resume"]:
        check_output(output, False, "choose a new --output, or continue that run with --resume")
    elif output.exists() and not output.is_dir():
        raise CLIError(f"output {output} exists and is not a directory: choose another --output")
    model, tokenizer = load_base(config)
    try:  # the guide's initialisation follows --seed too
        guide = Guide.create(
            model, config["variant"], tokenizer=tokenizer, seed=config["seed"], **guide_options(config)
        )
    except (TypeError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    check_samples(guide, samples, config["allow_base_mismatch"])
    resume_step = _resume_step(config, output)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    run = Run(output, output)
    try:
        report = _train_in(run, config, guide, samples, tokenizer, resume_step)
        guide.save_pretrained(run.path / "guide")
        atomic_write_text(run.path / "train_report.json", json.dumps(report.to_dict()))
    except Interrupted:
        raise
    except KeyboardInterrupt as exc:
        raise interrupted(exc, _train_leftover(output, created)) from None
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise
    print(f"trained a {config['variant']} guide for {report.steps} steps; saved to {run.path / 'guide'}")


def _load_samples(config: dict[str, Any]) -> SampleSet:
    samples = SampleSet.load(samples_path(config["samples"]))
    if not bool((samples.labels > 0).any()) and not config["allow_no_positives"]:
        raise CLIError(
            f"no sample in {config['samples']} satisfies the oracle (all {len(samples)} labels are 0): a guide "
            "trained on them would be meaningless; sample more, sample from a proposal (`dinado sample --guide` or "
            "--temperature), add positives, or pass --allow-no-positives"
        )
    return samples


def _resume_step(config: dict[str, Any], output: Path) -> int:
    """The step --resume continues from (0 without --resume or a checkpoint), after checking its variant."""
    if not config["resume"]:
        return 0
    checkpoint = latest_checkpoint(output / "checkpoints")
    if checkpoint is None:
        print(f"--resume: no checkpoint in {output / 'checkpoints'} yet: starting from step 0", flush=True)
        return 0
    saved = json.loads((checkpoint / "dinado_config.json").read_text()).get("variant")
    if saved != config["variant"]:
        raise CLIError(
            f"{checkpoint} holds a {saved} guide but --variant is {config['variant']}: resume with "
            f"--variant {saved}, or train {config['variant']} into another --output"
        )
    step = int(checkpoint.name[len(CHECKPOINT_PREFIX) :])
    print(f"resuming {output} from {checkpoint.name} (step {step})", flush=True)
    return step


def _train_in(run: Run, config: dict[str, Any], guide, samples, tokenizer, resume_step: int) -> TrainReport:
    """dinado.train in ``run``, logging every step; Interrupted when a stop request ended it early."""
    from torch.utils.tensorboard import SummaryWriter

    _truncate_metrics(run.path / "metrics.jsonl", resume_step)
    run.write_config(config)
    writer = SummaryWriter(str(run.path / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
    stop = StopRequest()
    try:
        wandb_run = _start_wandb(config, run) if config["report_to"] == "wandb" else None
        validate = _validator(config, guide, tokenizer)
        options = {key: config[key] for key in (*TRAIN_SPEC, "seed", "resume", "allow_base_mismatch")}
        if options["epochs"] is None and not options["max_steps"]:
            options["epochs"] = 1.0
        with stop.installed():
            report = train(
                guide,
                samples,
                **options,
                progress=True,
                checkpoint_dir=run.path / "checkpoints",
                on_step=_step_logger(config, run, writer, wandb_run, validate),
                should_stop=lambda: stop.signum is not None,
            )
        if wandb_run is not None:
            wandb_run.finish()
    finally:
        writer.close()
    if report.stopped_early:
        raise Interrupted(
            stop.signum == signal.SIGTERM,
            f"stopped after step {report.steps}; {run.path} keeps checkpoint-{report.steps}: continue with "
            "the same command and --resume",
        )
    return report


def _step_logger(
    config: dict[str, Any], run: Run, writer, wandb_run, validate
) -> Callable[[int, dict], None]:
    """on_step for dinado.train: metrics.jsonl, TensorBoard, wandb, and validation every --val-every steps."""

    def on_step(step: int, values: dict[str, float]) -> None:
        record = {"step": step, **values}
        if validate is not None and (step % config["val_every"] == 0 or step == 1):
            record["val_success"] = validate()
        run.log(record)
        for key, value in record.items():
            if key != "step":
                writer.add_scalar(f"train/{key}", value, step)
        if wandb_run is not None:
            wandb_run.log(record, step=step)

    return on_step


def _start_wandb(config: dict[str, Any], run: Run):
    try:
        import wandb
    except ImportError:
        raise CLIError("--report-to wandb needs the wandb package: pip install wandb") from None
    return wandb.init(project="dinado", name=run.path.name, dir=str(run.path), config=config)


def _validator(config: dict[str, Any], guide, tokenizer) -> Callable[[], float] | None:
    """Success of the guide's samples on --val-prompts under the samples' oracle, or None when not asked."""
    if not config.get("val_prompts"):
        return None
    oracle = text_oracle(config)
    if oracle is None:
        raise CLIError("--val-prompts needs the oracle to judge with: --keywords or --oracle")
    prompts = read_prompts(config["val_prompts"])
    fmt = prompt_format(config, tokenizer, guide.base)

    def validate() -> float:
        state = torch.get_rng_state()  # validation must not change the training run's random stream
        torch.manual_seed(config["seed"])
        texts, _, _ = generate_texts(
            guide,
            tokenizer,
            prompts,
            64,
            prompt_format=fmt,
            do_sample=True,
            top_k=0,
            max_new_tokens=config["val_max_new_tokens"],
            pad_token_id=tokenizer.pad_token_id,
        )
        torch.set_rng_state(state)
        values = call_oracle(oracle, prompts, texts)
        return sum(values) / len(values)

    return validate


class StopRequest:
    """While training: the first Ctrl-C or SIGTERM asks to stop after the current step (with a checkpoint);
    a second one stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            # the second signal stops at once (re-sent if it lands in a finalizer)
            raise_interrupt(signum, frame)
            return
        self.signum = signum
        print(
            "\ndinado train: stopping after this step and saving a checkpoint (press Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        try:
            previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: leave the signals alone
            previous = {}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _truncate_metrics(file: Path, last_step: int) -> None:
    """Keep the records of steps <= ``last_step``: the resumed run writes the later ones again."""
    if not file.is_file():
        return
    kept = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line torn by SIGKILL
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    atomic_write_text(file, "".join(line + "\n" for line in kept))


def _train_leftover(output: Path, created: bool) -> str:
    """What an interrupted `train` leaves: a resumable directory, or none."""
    checkpoint = latest_checkpoint(output / "checkpoints")
    if checkpoint is not None:
        return f"{output} keeps {checkpoint.name}: continue with the same command and --resume"
    if created:
        shutil.rmtree(output, ignore_errors=True)
        return f"no checkpoint had been written, so {output} was removed; run the command again"
    return f"{output} holds no checkpoint yet: --resume starts from step 0"
