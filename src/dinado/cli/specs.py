"""The schema of each subcommand: key -> (default, kind, help), one key per flag and per config-file key.

What the Python API declares is generated from it: `train`'s guide options from GuideConfig's fields (help from
their ``metadata["help"]`` or GuideConfig's docstring), its training options' defaults and kinds from
`dinado.train`'s signature, and `pretrain` from PretrainConfig's fields. What only the CLI has (run directories,
prompts files, oracles, prompt formats, decoding) is written out below.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..config import GuideConfig
from ..pretrain import PretrainConfig
from ..training import train
from .values import PLAIN, SIZES, STEPS, kind_of

# key -> (default, kind, help); kind is a key of values.KINDS. A key may be null (None) when its default is None
# or the command lists it in NULLABLE. Config files may hold only these keys.
Spec = dict[str, tuple[Any, str, str]]
NULLABLE: dict[str, set[str]] = {}


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


# ---------------------------------------------------------------------- generated from the Python API
# `name / other: text` at the start of a docstring line
_ENTRY = re.compile(r"^(\w+\*?(?: / \w+\*?)*): (.*)$")


def docstring_help(cls: type) -> dict[str, str]:
    """Each name's text in a docstring written as ``name / other: text`` entries (continued on indented lines); a
    name that shares its entry is named in its text (``module_dim of the small transformer stack ...``)."""
    entries: list[tuple[list[str], list[str]]] = []
    in_entry = False
    for line in inspect.cleandoc(cls.__doc__ or "").splitlines()[1:]:
        if match := _ENTRY.match(line):
            entries.append((match[1].split(" / "), [match[2]]))
        elif in_entry and line.startswith(" "):
            entries[-1][1].append(line.strip())
        in_entry = bool(match) or (in_entry and line.startswith(" "))
    texts = {}
    for names, lines in entries:
        text = re.sub(r":\w+:`~?([^`]*)`", r"\1", " ".join(lines)).replace("``", "")
        for name in names:
            shared = " of " if text.startswith("the ") else ": "
            texts[name] = f"{name}{shared}{text}" if len(names) > 1 else text
    return texts


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def dataclass_spec(
    cls: type,
    numbers: Mapping[str, str],
    fallback_help: Callable[[str], str],
    keep: Callable[[str], bool] = lambda name: True,
    defaults: Mapping[str, Any] | None = None,
) -> tuple[Spec, set[str]]:
    """One key per field of ``cls`` that ``keep`` names: its default (or ``defaults``'), its kind (``numbers``
    picks the range rule of numbers), its ``metadata["help"]`` (else ``fallback_help(name)``); and the keys
    whose type allows None."""
    spec: Spec = {}
    nullable = set()
    for f in dataclasses.fields(cls):
        if not keep(f.name):
            continue
        kind, may_be_none = kind_of(f.type, numbers)
        kind = f.metadata.get("kind", kind)
        if may_be_none:
            nullable.add(f.name)
        default = (defaults or {}).get(f.name, _default(f))
        spec[f.name] = (default, kind, f.metadata.get("help") or fallback_help(f.name))
    return spec, nullable


def signature_spec(
    function: Callable[..., Any], helps: Mapping[str, str], numbers: Mapping[str, str], defaults=None
) -> Spec:
    """One key per keyword argument of ``function`` in ``helps`` (its order): the signature's default (or
    ``defaults``'), the kind of its annotation and the help given."""
    parameters = inspect.signature(function).parameters
    return {
        name: (
            (defaults or {}).get(name, parameters[name].default),
            kind_of(parameters[name].annotation, numbers)[0],
            text,
        )
        for name, text in helps.items()
    }


def is_guide_option(name: str) -> bool:
    """Not what a guide records about its base (base_*, *_fingerprint, extra): those are filled in for it."""
    return not (name.startswith("base_") or name.endswith("_fingerprint") or name == "extra")


_GUIDE_HELP = docstring_help(GuideConfig)
# `train`'s options for Guide.create: every GuideConfig field but the bookkeeping. Where the CLI's default differs:
# it trains dinado-soft unless told, and its pointer is on (GuideConfig's None means on for the module variants;
# `train` leaves the head options out for dinado-merge, see train.guide_options). A guide option may be null where
# its default is None (so `pointer: null` stays an error).
GUIDE_SPEC, _ = dataclass_spec(
    GuideConfig,
    SIZES,
    lambda name: _GUIDE_HELP.get(name, f"GuideConfig.{name}"),
    keep=is_guide_option,
    defaults={"variant": "dinado-soft", "pointer": True},
)
NULLABLE["train"] = {"head_rank"}  # "auto" by default; null asks for a full-rank head
# `train`'s options for dinado.train, with its defaults (and a checkpoint every 200 steps, where it keeps none)
TRAIN_SPEC = signature_spec(
    train,
    {
        "max_steps": "training steps",
        "epochs": "epochs (default 1 when --max-steps is not given; with both, the smaller wins)",
        "batch_size": "sequences per step (as dinado.train)",
        "micro_batch_size": "split steps into chunks for memory",
        "learning_rate": "default: 1e-3; Hard consistency: 1e-3 x 6 / mean completion length when that is over 6",
        "adam_epsilon": "AdamW's epsilon (1e-4 damps a short run's noisy first steps: docs/demo.md)",
        "weight_clip": "cap on self-normalised importance weights",
        "use_weights": "apply importance weights recorded in the samples",
        "checkpoint_every": "steps between checkpoints",
    },
    STEPS,
    defaults={"checkpoint_every": 200},
)
# `pretrain` takes every PretrainConfig field (whose own checks then apply)
PRETRAIN_SPEC, NULLABLE["pretrain"] = dataclass_spec(
    PretrainConfig, PLAIN, lambda name: f"PretrainConfig.{name} (see docs/pretrain.md)"
)

# ---------------------------------------------------------------------- the CLI's own keys
_COMMON: Spec = {
    "output": (None, "str", "the run directory to write (required)"),
    "seed": (0, "int", "random seed"),
}
_MODEL: Spec = {
    "base": (
        None,
        "str",
        "base model: a hub id, a local directory, a .gguf file or a named offline base "
        "(smollm2-135m-instruct) (required)",
    ),  # fmt: skip
    "gguf_file": (None, "str", "a GGUF file inside the --base directory or hub repository"),
    "tokenizer": (None, "str", "tokenizer id or path (default: the base's)"),
}
_PROMPT: Spec = {
    "prompt_template": (
        None,
        "str",
        "a template for each prompt line, with {prompt} (the line) and/or {keywords} (the line as "
        "a keyword list, joined by ', '), e.g. 'Write one short sentence that uses all of these words: "
        "{keywords}.'; oracles still read the line itself",
    ),  # fmt: skip
    "chat": (
        "auto",
        "auto_bool",
        "put each prompt in the user turn of the tokenizer's chat template and stop at "
        "its end of turn (auto: when the tokenizer has a chat template)",
    ),  # fmt: skip
}
_ORACLE: Spec = {
    "oracle": (None, "mapping", "an oracle config (YAML/JSON mapping), see docs/oracles.md"),
    "keywords": (None, "str", "shortcut for a keyword oracle: comma-separated keywords"),
}
_DECODE: Spec = {
    "prompts": (None, "str", "a text file with one prompt per line (required)"),
    "max_new_tokens": (32, "count", "tokens to generate per prompt"),
    "temperature": (1.0, "positive", "sampling temperature"),
    "top_p": (1.0, "probability", "nucleus sampling threshold"),
    "batch_size": (32, "count", "prompts per batch"),
}
_OVERWRITE: Spec = {
    "overwrite": (False, "flag", "replace an existing output directory (only once the new one is complete)"),
}
_MISMATCH: Spec = {
    "allow_base_mismatch": (
        False,
        "flag",
        "use a guide or samples with a base or tokenizer other than the one they were made with",
    ),
}
SPECS: dict[str, Spec] = {
    "sample": {
        **_COMMON,
        **_MODEL,
        **_DECODE,
        **_PROMPT,
        **_ORACLE,
        "guide": (None, "str", "sample from this guide as a proposal (importance weights are recorded)"),
        "num_samples": (8, "count", "completions per prompt"),
        **_OVERWRITE,
        **_MISMATCH,
    },
    "train": {
        **_COMMON,
        **_MODEL,
        "samples": (None, "str", "a SampleSet file or a `dinado sample` run directory (required)"),
        **GUIDE_SPEC,
        **TRAIN_SPEC,
        "resume": (False, "flag", "continue from the last checkpoint in --output"),
        "allow_no_positives": (False, "flag", "train even if no sample satisfies the oracle"),
        "report_to": ("none", "str", "also log to 'wandb' (needs the wandb package), or 'none'"),
        "val_prompts": (None, "str", "prompts file: track the guide's oracle success on them while training"),
        "val_every": (100, "count", "steps between validation runs"),
        "val_max_new_tokens": (32, "count", "tokens per validation sample"),
        **_PROMPT,
        **_ORACLE,
        **_MISMATCH,
    },
    "generate": {
        **_COMMON,
        **_MODEL,
        **_DECODE,
        **_PROMPT,
        "guide": (None, "str", "a saved guide directory (omit to decode with the base alone)"),
        "do_sample": (False, "bool", "sample instead of greedy/beam search"),
        "num_beams": (1, "count", "beam width"),
        "num_return_sequences": (1, "count", "outputs per prompt (with --do-sample true)"),
        "no_repeat_ngram_size": (
            None,
            "count",
            "no n-gram of this many tokens occurs twice in a sequence (transformers' no_repeat_ngram_size: "
            "against repetition loops, and lists copied from the prompt, in beam search and greedy decoding; "
            "with --do-sample it moves the samples away from q_theta). The prompt counts too, chat template "
            "included, which can push a base off its usual answers (docs/results/commongen.md)",
        ),  # fmt: skip
        "alpha": (1.0, "nonnegative", "guidance strength (1 = the method)"),
        "candidates": (
            None,
            "count",
            "guide only the base's top-k tokens and the tokens so far (cheaper head; approximates q_theta)",
        ),  # fmt: skip
        "adapter_scale": (
            1.0,
            "nonnegative",
            "with a dinado-merge --guide: decode the base with this multiple of the adapter's weight change "
            "folded in, as `dinado merge --adapter-scale` does (1 decodes q_theta; choose another on held-out "
            "conditions)",
        ),
        "rerank_by_value": (
            False,
            "bool",
            "with --num-beams N >= 2 and --guide: keep all N final beams and return the one with the highest "
            "value R_theta(x) of --guide, its own estimate of the oracle (no oracle call; +4 to +6 points of "
            "beam-4 success on CommonGen dev, docs/results/commongen.md)",
        ),
        **_OVERWRITE,
        **_MISMATCH,
    },
    "evaluate": {
        **_COMMON,
        **_MODEL,
        **_ORACLE,
        "generations": (None, "str", "a `dinado generate` run directory or generations.jsonl (required)"),
        "compare": (None, "str", "another generate run (e.g. the base) to show side by side"),
        "references": (None, "str", "a text file, one line per prompt, references separated by ' ||| '"),
        "train_run": (None, "str", "a `dinado train` run directory: plot its training curves"),
        "prompt_template": (None, "str", "as for generate (default: the --generations run's)"),
        "chat": (None, "auto_bool", "as for generate (default: the --generations run's)"),
        **_OVERWRITE,
    },
    "merge": {
        **_COMMON,
        **_MODEL,
        "guide": (None, "str", "a saved dinado-merge guide directory (required)"),
        "adapter_scale": (
            1.0,
            "nonnegative",
            "fold in this multiple of the adapter's weight change (1 = q_theta; another value is a strength in "
            "weight space: choose it on held-out conditions, e.g. benchmarks/commongen/strength.py)",
        ),
        **_OVERWRITE,
        **_MISMATCH,
    },
    "pretrain": {**_COMMON, **PRETRAIN_SPEC, **_OVERWRITE},
    "demo": {
        "task": (
            "commongen",
            "str",
            "commongen (SmolLM2 on CommonGen concept sets) or toy (the toy language)",
        ),
        "data_dir": (
            None,
            "str",
            "CommonGen files {split}_src.txt/_trg.txt (--task commongen; required there)",
        ),
        "base": (
            "smollm2-135m-instruct",
            "str",
            "the base model of --task commongen (a hub id or directory)",
        ),
        "output": ("runs/demo", "str", "run directory (the toy task caches its pretrained base there)"),
        "seed": (0, "int", "random seed"),
        "quick": (False, "flag", "a smaller, faster run (a smoke test)"),
        "threads": (
            None,
            "count",
            "torch threads (default: 1 for the toy task, whose small models run fastest so; torch's own choice "
            "for commongen)",
        ),
    },
}


def nullable(command: str, key: str) -> bool:
    return SPECS[command][key][0] is None or key in NULLABLE.get(command, set())
