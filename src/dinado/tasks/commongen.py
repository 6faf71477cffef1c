"""CommonGen: loaders (paths as arguments), the `concepts =` prompt format and its concept reader, the coverage
oracle and metrics.

Files: parallel line files ``{split}_src.txt`` (space-separated concepts) and ``{split}_trg.txt`` (one reference
per line), as in shared/data/commongen/v1.1_LHRYANG; a concept set with k references spans k lines.
:func:`load_hf` reads the Hugging Face ``common_gen`` dataset instead (optional ``datasets`` dependency, needs
the hub or its cache).
Metrics: concept coverage and all-concepts success (the inflection-aware keyword oracle), and pycocoevalcap's
BLEU-4, CIDEr, METEOR and ROUGE-L (offline; METEOR needs Java). SPICE needs a model download and is reported
as unavailable (None), never estimated.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..oracles import AllOf, CallableOracle, Floor, KeywordOracle
from ..oracles.base import OracleBase

PROMPT_MARKER = "="
# what an instruct base (one whose tokenizer has a chat template) reads in its user turn; a base trained on
# ``concepts = sentence`` reads the prompt line as it is
INSTRUCTION = "Write one short sentence that uses all of these words: {keywords}."
SPLITS = {"train": "train", "dev": "valid", "valid": "valid", "test": "test"}


@dataclass
class ConceptSet:
    concepts: list[str]
    references: list[str] = field(default_factory=list)

    @property
    def prompt(self) -> str:
        return format_prompt(self.concepts)


def format_prompt(concepts: Sequence[str]) -> str:
    """The prompt the base model is trained on: ``"dog frisbee catch ="``."""
    return " ".join(concepts) + " " + PROMPT_MARKER


def load_pairs(src_path: str | os.PathLike, tgt_path: str | os.PathLike) -> list[ConceptSet]:
    """Group parallel src/trg lines into concept sets (same concepts in any order = one set), in file order."""
    src, tgt = Path(src_path), Path(tgt_path)
    for f in (src, tgt):
        if not f.is_file():
            raise FileNotFoundError(f"CommonGen file {f} not found")
    sources = src.read_text(encoding="utf-8").splitlines()
    targets = tgt.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(targets):
        raise ValueError(
            f"{src} has {len(sources)} lines but {tgt} has {len(targets)}: they must be parallel"
        )
    sets: dict[tuple[str, ...], ConceptSet] = {}
    for i, (line, reference) in enumerate(zip(sources, targets, strict=True)):
        concepts = line.split()
        if not concepts:
            raise ValueError(f"{src}:{i + 1} has no concepts")
        key = tuple(sorted(concepts))
        sets.setdefault(key, ConceptSet(concepts)).references.append(reference.strip())
    return list(sets.values())


def load_split(data_dir: str | os.PathLike, split: str) -> list[ConceptSet]:
    """``split`` in train, dev (= valid), test from a directory holding ``{split}_src.txt``/``{split}_trg.txt``."""
    if split not in SPLITS:
        raise ValueError(f"unknown CommonGen split {split!r}: choose one of {', '.join(SPLITS)}")
    name = SPLITS[split]
    root = Path(data_dir)
    return load_pairs(root / f"{name}_src.txt", root / f"{name}_trg.txt")


HF_SPLITS = {
    "train": "train",
    "dev": "validation",
    "valid": "validation",
    "validation": "validation",
    "test": "test",
}


def load_hf(split: str, name: str = "allenai/common_gen", **load_kwargs) -> list[ConceptSet]:
    """The Hugging Face ``common_gen`` dataset (needs ``datasets`` and a reachable hub, or its cache).

    Rows are grouped into concept sets like :func:`load_pairs`. The hub's ``test`` split has no references
    (empty targets are dropped, leaving ``references == []``); use the v1.0 public test files with
    :func:`load_split` for scored test numbers. ``load_kwargs`` go to ``datasets.load_dataset``
    (e.g. ``cache_dir=``, ``revision=``).
    """
    if split not in HF_SPLITS:
        raise ValueError(f"unknown CommonGen split {split!r}: choose one of {', '.join(HF_SPLITS)}")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "load_hf needs the `datasets` package: pip install 'dinado[hf]' "
            "(or use load_split(data_dir, split) with local CommonGen files)"
        ) from err
    try:
        rows = datasets.load_dataset(name, split=HF_SPLITS[split], **load_kwargs)
    except Exception as err:  # offline hubs raise several different error types
        raise RuntimeError(
            f"could not load the Hugging Face dataset {name!r} (split {HF_SPLITS[split]!r}): {err}. "
            "Without a reachable hub or a local cache, use load_split(data_dir, split) with the CommonGen files"
        ) from err
    sets: dict[tuple[str, ...], ConceptSet] = {}
    for i, row in enumerate(rows):
        concepts = [str(c).strip() for c in row.get("concepts") or [] if str(c).strip()]
        if not concepts:
            raise ValueError(f"{name} {split} row {i} has no concepts")
        entry = sets.setdefault(tuple(sorted(concepts)), ConceptSet(concepts))
        target = (row.get("target") or "").strip()
        if target:
            entry.references.append(target)
    return list(sets.values())


class CommonGenConcepts:
    """Reads the concept set from a CommonGen-style prompt ``"dog frisbee catch ="``.

    The concepts are the text between the start of the last line and the last ``marker`` (so few-shot prompts
    with one example per line work), split on whitespace, or on ``sep`` (e.g. ``","`` for multi-word
    concepts like ``"ice cream, dog ="``). ``marker=None`` takes the whole last line. A keyword oracle holding
    it is written as the config ``{"type": "keywords", "from_prompt": "commongen", "marker": ..., "sep": ...}``.
    """

    def __init__(self, marker: str | None = PROMPT_MARKER, sep: str | None = None) -> None:
        if marker is not None and (not isinstance(marker, str) or not marker.strip()):
            raise ValueError(f"marker must be a non-blank string or None, got {marker!r}")
        if sep is not None and (not isinstance(sep, str) or not sep):
            raise ValueError(f"sep must be a non-empty string or None, got {sep!r}")
        self.marker = marker
        self.sep = sep

    def __call__(self, prompt: str) -> list[str]:
        head = prompt
        if self.marker is not None:
            head, found, _ = prompt.rpartition(self.marker)
            if not found:
                raise ValueError(f"the prompt {prompt!r} has no {self.marker!r} marker after its concepts")
        head = head.rstrip().split("\n")[-1]
        parts = head.split(self.sep) if self.sep is not None else head.split()
        return [p.strip() for p in parts if p.strip()]

    def __repr__(self) -> str:
        return f"CommonGenConcepts(marker={self.marker!r}, sep={self.sep!r})"

    def to_config(self) -> dict[str, Any]:
        """The ``from_prompt`` keys of a keywords oracle config."""
        return {"from_prompt": "commongen", "marker": self.marker, "sep": self.sep}


def coverage_oracle(
    soft: bool = False,
    *,
    marker: str | None = PROMPT_MARKER,
    sep: str | None = None,
    sentences_only: bool = False,
    finished_only: bool = False,
    unfinished_weight: float = 0.0,
) -> OracleBase:
    """Inflection-aware concept coverage read from each prompt (:class:`CommonGenConcepts`): all-or-nothing,
    or the covered share (``soft=True``). (Formerly ``KeywordOracle.commongen(marker=, sep=, soft=)``.)

    ``sentences_only=True`` gives 0 to comma-separated word lists and repetition loops (:func:`is_sentence`)
    whatever they cover: ``AllOf(CallableOracle(sentence_check), coverage)``, so that a guide trained on its
    labels is not rewarded for listing or repeating the concepts instead of writing a sentence.

    ``finished_only=True`` gives 0 to each completion that does not end its sentence (:func:`is_finished`; a
    completion cut by the token limit mid-sentence), so that a guide trained on its labels is not rewarded for
    running on to cover one more concept (``AllOf(CallableOracle(finished_check), ...)``). With
    ``unfinished_weight=w`` in (0, 1) such a completion keeps ``w`` times its value instead of 0 (a soft penalty:
    ``Floor(CallableOracle(finished_check), w)``)."""
    if isinstance(unfinished_weight, bool) or not isinstance(unfinished_weight, (int, float)):
        raise TypeError(f"unfinished_weight must be a number in [0, 1), got {unfinished_weight!r}")
    if not 0.0 <= unfinished_weight < 1.0:
        raise ValueError(f"unfinished_weight must be in [0, 1), got {unfinished_weight!r}")
    if unfinished_weight > 0 and not finished_only:
        raise ValueError(
            "unfinished_weight only applies with finished_only=True (it is what an unfinished completion's "
            "label is multiplied by instead of 0)"
        )
    coverage = KeywordOracle(CommonGenConcepts(marker=marker, sep=sep), soft=soft)
    checks: list[OracleBase] = [CallableOracle(sentence_check)] if sentences_only else []
    if finished_only:
        finished = CallableOracle(finished_check)
        checks.append(Floor(finished, unfinished_weight) if unfinished_weight > 0 else finished)
    return AllOf(*checks, coverage) if checks else coverage


_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def _tokenize(text: str) -> str:
    """Lower-case word/punctuation tokens joined by spaces (what the COCO scorers expect)."""
    return " ".join(_TOKEN.findall(text.lower()))


@functools.lru_cache(maxsize=1)
def _meteor():
    """One METEOR scorer (a Java subprocess, ~6 s to start) shared by every call, stopped at exit."""
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    atexit.register(_close_meteor, scorer)
    return scorer


def _close_meteor(scorer) -> None:
    process = getattr(scorer, "meteor_p", None)
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


def caption_metrics(outputs: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float | None]:
    """Corpus BLEU-4, CIDEr, METEOR, ROUGE-L (pycocoevalcap) of one output per concept set; SPICE: None, and METEOR
    None (with a warning) on a machine without Java."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} reference sets")
    if any(len(r) == 0 for r in references):
        raise ValueError("every output needs at least one reference")
    gts = {str(i): [_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {str(i): [_tokenize(o) or "."] for i, o in enumerate(outputs)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    meteor = None
    if shutil.which("java") is None:
        warnings.warn(
            "METEOR needs Java, which is not on this machine's PATH: it is reported as n/a (None); score the "
            "outputs again where Java is installed",
            stacklevel=2,
        )
    else:
        scorer = _meteor()
        try:
            meteor, _ = scorer.compute_score(gts, res)
        except BaseException:  # a half-read reply leaves the subprocess (and its lock) unusable: start afresh
            _close_meteor(scorer)
            _meteor.cache_clear()
            raise
    return {
        "bleu4": float(bleu[3]),
        "cider": float(cider),
        "meteor": None if meteor is None else float(meteor),
        "rouge_l": float(rouge),
        "spice": None,
    }


def is_word_list(text: str) -> bool:
    """Whether an output reads as a comma-separated list of words rather than a sentence: at least 4 commas and
    at least one comma per 3 words. A coverage oracle rewards such lists ("sit, while, the, arm, make, stand,
    ..."); a guide pushed too hard learns to produce them (docs/results/commongen.md)."""
    commas = text.count(",")
    return commas >= 4 and 3 * commas >= len(text.split())


_WORD = re.compile(r"[\w'-]+")


def is_loop(text: str, times: int = 3, max_n: int = 4) -> bool:
    """Whether an output falls into a repetition loop: some run of 1 to ``max_n`` words repeated ``times`` times
    in a row, case and punctuation ignored ("dance dance dance", "Talk Talk Talk", "of the wall of the wall of the
    wall"). A coverage oracle rewards a loop over a concept as much as a sentence; a guide pushed too hard
    produces them (docs/results/commongen.md)."""
    if times < 2 or max_n < 1:
        raise ValueError(f"times must be at least 2 and max_n at least 1, got times={times}, max_n={max_n}")
    words = _WORD.findall(text.lower())
    for n in range(1, max_n + 1):
        for i in range(len(words) - n * times + 1):
            gram = words[i : i + n]
            if all(words[i + k * n : i + (k + 1) * n] == gram for k in range(1, times)):
                return True
    return False


def is_sentence(text: str) -> bool:
    """Neither a comma-separated word list (:func:`is_word_list`) nor a repetition loop (:func:`is_loop`)."""
    return not is_word_list(text) and not is_loop(text)


_FINISHED = re.compile(r"[.!?][\"'”’)\]]*\s*$")


def is_finished(text: str) -> bool:
    """Whether an output ends its sentence: its last non-space character is ``.``, ``!`` or ``?``, possibly
    followed by closing quotes or brackets. An output cut by the token limit mid-sentence is not finished."""
    return _FINISHED.search(text) is not None


def finished_check(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """A batched text oracle: 1.0 for each completion that ends its sentence (:func:`is_finished`), else 0.0
    (the prompts are not read)."""
    return _text_check(prompts, completions, is_finished)


def sentence_check(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
    """A batched text oracle: 0.0 for each completion that is a comma-separated word list or a repetition loop
    (:func:`is_sentence`), 1.0 otherwise (the prompts are not read)."""
    return _text_check(prompts, completions, is_sentence)


def _text_check(prompts: Sequence[str], completions: Sequence[str], passes) -> list[float]:
    """1.0 for each completion that ``passes(completion)``, else 0.0, one per prompt (the prompts are not read)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return [1.0 if passes(c) else 0.0 for c in completions]


def commongen_metrics(sets: Sequence[ConceptSet], outputs: Sequence[str]) -> dict[str, float | None]:
    """Coverage, all-concepts success and the caption metrics for one output per concept set; ``word_lists`` and
    ``loops`` are the shares of outputs that are comma-separated word lists (:func:`is_word_list`) and repetition
    loops (:func:`is_loop`), ``sentence_success`` the all-concepts success counting both as failures, and
    ``unfinished`` the share of outputs that do not end their sentence (:func:`is_finished`: cut by the token
    limit)."""
    if len(sets) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(sets)} concept sets")
    prompts = [s.prompt for s in sets]
    oracle = coverage_oracle()
    cover = oracle.coverage(prompts, list(outputs))
    flat = [c for row in cover for c in row]
    lists = [is_word_list(o) for o in outputs]
    loops = [is_loop(o) for o in outputs]
    sentences = [not (listed or looped) for listed, looped in zip(lists, loops, strict=True)]  # is_sentence
    metrics: dict[str, float | None] = {
        "coverage": sum(flat) / len(flat),
        "success": sum(all(row) for row in cover) / len(cover),
        "sentence_success": sum(all(row) and ok for row, ok in zip(cover, sentences, strict=True))
        / len(cover),
        "word_lists": sum(lists) / len(lists),
        "loops": sum(loops) / len(loops),
        "unfinished": sum(not is_finished(o) for o in outputs) / len(outputs),
        "mean_words": sum(len(o.split()) for o in outputs) / len(outputs),
    }
    metrics.update(caption_metrics(outputs, [s.references for s in sets]))
    return metrics
