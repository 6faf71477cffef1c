"""Oracles: callables that judge whole sequences, on token ids or on decoded text, in batches.

An oracle is ``oracle(prompts, completions) -> values in [0, 1]``, one value per sample. The sampler and the
exact evaluator call it on token ids; the oracles defined here (keywords, regex, classifier, user callables
and their compositions) judge decoded text, and :class:`TextOracle` (or :func:`as_token_oracle`) adapts them
to token ids. Every oracle here can be described by a plain dict (:func:`oracle_from_config` builds one,
``oracle.to_config()`` gives it back), so a YAML file can hold it. See docs/oracles.md.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

TokenOracle = Callable[[list[list[int]], list[list[int]]], Sequence[float]]

__all__ = [
    "AllOf",
    "AnyOf",
    "CallableOracle",
    "ClassifierOracle",
    "CommonGenConcepts",
    "KeywordOracle",
    "Not",
    "Oracle",
    "OracleBase",
    "RegexOracle",
    "TextOracle",
    "TokenOracle",
    "WeightedProduct",
    "as_token_oracle",
    "call_oracle",
    "describe",
    "load_callable",
    "oracle_from_config",
]

LEMMINFLECT_REQUIREMENT = "lemminflect>=0.2.3,<0.3"


class Oracle(Protocol):
    """``oracle(prompts, completions) -> values in [0, 1]``, one per sample, batched."""

    def __call__(self, prompts: list[Any], completions: list[Any]) -> Sequence[float]: ...


class TextOracle:
    """Adapts an oracle on text to token ids by decoding with a tokenizer (special tokens dropped)."""

    level = "tokens"

    def __init__(
        self,
        fn: Callable[[list[str], list[str]], Sequence[float]],
        tokenizer: Any,
        prompt_texts: Mapping[tuple[int, ...], str] | None = None,
    ) -> None:
        self.fn = fn
        self.tokenizer = tokenizer
        # the text a prompt's token ids stand for (e.g. a prompts-file line before a template or chat
        # template decorated it): the oracle judges that, not the decoded decoration
        self.prompt_texts = dict(prompt_texts or {})

    def __call__(self, prompts: list[list[int]], completions: list[list[int]]) -> Sequence[float]:
        decode = lambda rows: self.tokenizer.batch_decode(rows, skip_special_tokens=True)
        texts = [self.prompt_texts.get(tuple(p)) for p in prompts]
        missing = [i for i, t in enumerate(texts) if t is None]
        if missing:
            for i, text in zip(missing, decode([prompts[i] for i in missing]), strict=True):
                texts[i] = text
        return self.fn(texts, decode(completions))

    def __repr__(self) -> str:
        return f"TextOracle({getattr(self.fn, '__name__', repr(self.fn))})"


def describe(oracle: Callable) -> str:
    return getattr(oracle, "__qualname__", None) or repr(oracle)


class OracleError(RuntimeError):
    """An oracle raised while judging samples; the message names the first sample that fails."""


def _first_failing_sample(oracle: Callable, prompts: list, completions: list) -> tuple[int, Exception] | None:
    for i in range(len(completions)):
        try:
            oracle(prompts[i : i + 1], completions[i : i + 1])
        except Exception as exc:
            return i, exc
    return None


def call_oracle(oracle: Callable, prompts: list, completions: list) -> list[float]:
    """Call ``oracle`` on a batch and check its answer: one finite value in [0, 1] per sample."""
    try:
        values = list(oracle(prompts, completions))
    except Exception:
        where = f"on a batch of {len(prompts)} samples"
        found = _first_failing_sample(oracle, prompts, completions)
        if found is not None:  # name the first sample that fails on its own
            i, exc = found
            where += f" (first failing: sample {i}, completion {str(completions[i])[:80]!r})"
        raise OracleError(
            f"the oracle {describe(oracle)} raised {where}: {exc} (fix the oracle: it must take a batch of "
            "prompts and completions and return one value in [0, 1] per sample)"
        ) from exc
    if len(values) != len(completions):
        raise ValueError(
            f"the oracle {describe(oracle)} returned {len(values)} values for {len(completions)} samples: "
            "it must return one value per sample"
        )
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(
                f"the oracle returned {v!r} for sample {i}: expected a number in [0, 1]"
            ) from None
        if not math.isfinite(f) or f < 0 or f > 1:
            raise ValueError(f"the oracle returned {f!r} for sample {i}: values must be finite and in [0, 1]")
        out.append(f)
    return out


# ----------------------------------------------------------------------------------------------------------
# shared pieces


class OracleBase:
    """Base of the oracles defined here: batched ``__call__``, a readable ``repr`` and ``to_config()``.

    ``level`` says what the oracle reads: ``"text"`` (decoded strings) or ``"tokens"`` (token-id lists).
    """

    level: str | None = "text"

    def __call__(self, prompts: list, completions: list) -> list[float]:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_config(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def description(self) -> str:
        return repr(self)


def _check_batch(prompts: Sequence, completions: Sequence) -> None:
    if len(prompts) != len(completions):
        raise ValueError(
            f"prompts and completions must have the same length; got {len(prompts)} and {len(completions)}"
        )


def _check_text(rows: Sequence, what: str) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, str):
            raise TypeError(
                f"{what}[{i}] is a {type(row).__name__}, not a str: this oracle reads decoded text; "
                "wrap it in TextOracle(oracle, tokenizer) to use it on token ids"
            )


def _level_of(oracle: Callable) -> str | None:
    level = getattr(oracle, "level", None)
    return level if level in ("text", "tokens") else None


def as_token_oracle(
    oracle: Callable, tokenizer: Any, prompt_texts: Mapping[tuple[int, ...], str] | None = None
) -> Callable:
    """An oracle on token ids: text-level oracles are wrapped in :class:`TextOracle` (``prompt_texts``: the
    text each prompt's ids stand for), others returned as is."""
    return TextOracle(oracle, tokenizer, prompt_texts) if _level_of(oracle) == "text" else oracle


def _config_of(oracle: Callable) -> dict[str, Any]:
    to_config = getattr(oracle, "to_config", None)
    if to_config is None:
        raise ValueError(
            f"{describe(oracle)} cannot be written as a config: wrap a function in "
            "CallableOracle('package.module:function')"
        )
    return to_config()


# ----------------------------------------------------------------------------------------------------------
# callables by import path


def load_callable(path: str) -> Callable:
    """Import ``"package.module:function"`` (the attribute may be dotted: ``"pkg.mod:Class.method"``)."""
    if not isinstance(path, str):
        raise TypeError(f"expected an import path 'package.module:function', got {path!r}")
    module_name, colon, attr = path.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not colon or not module_name or not attr or ":" in attr:
        raise ValueError(f"expected an import path of the form 'package.module:function', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ImportError(
                f"cannot load {path!r}: no module named {exc.name!r} (is it installed or on PYTHONPATH?)"
            ) from exc
        raise ImportError(f"cannot load {path!r}: importing {module_name!r} failed: {exc}") from exc
    except Exception as exc:
        raise ImportError(f"cannot load {path!r}: importing {module_name!r} failed: {exc}") from exc
    owner = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"cannot load {path!r}: {owner!r} has no attribute {part!r}")
        obj = getattr(obj, part)
        owner = f"{owner}:{part}" if owner == module_name else f"{owner}.{part}"
    if not callable(obj):
        raise TypeError(f"cannot load {path!r}: it is a {type(obj).__name__}, not a callable")
    return obj


def _import_path(fn: Callable) -> str | None:
    """``"module:qualname"`` if importing that gives back ``fn`` itself, else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or "<" in qualname:
        return None
    path = f"{module}:{qualname}"
    try:
        return path if load_callable(path) is fn else None
    except Exception:
        return None


class CallableOracle(OracleBase):
    """Any batched function ``fn(prompts, completions) -> values``, given itself or as ``"pkg.mod:fn"``.

    ``on="text"`` (default) when it reads decoded strings, ``on="tokens"`` when it reads token-id lists.
    """

    def __init__(self, fn: Callable | str, on: str = "text") -> None:
        if on not in ("text", "tokens"):
            raise ValueError(f"on must be 'text' or 'tokens', got {on!r}")
        if isinstance(fn, str):
            self.path: str | None = fn
            self.fn = load_callable(fn)
        elif callable(fn):
            self.fn = fn
            self.path = _import_path(fn)
        else:
            raise TypeError(f"expected a callable or an import path 'package.module:function', got {fn!r}")
        self.on = on
        self.level = on

    def __call__(self, prompts: list, completions: list) -> list[float]:
        _check_batch(prompts, completions)
        return list(self.fn(prompts, completions))

    def __repr__(self) -> str:
        name = repr(self.path) if self.path else getattr(self.fn, "__qualname__", repr(self.fn))
        return f"CallableOracle({name}, on={self.on!r})"

    def to_config(self) -> dict[str, Any]:
        if self.path is None:
            raise ValueError(
                f"{self!r} cannot be written as a config: its function is not importable by name; "
                "define it at module level and give it as 'package.module:function'"
            )
        return {"type": "callable", "path": self.path, "on": self.on}


# ----------------------------------------------------------------------------------------------------------
# keywords

_WORD = re.compile(r"[^\W_]+")


def _lemminflect() -> Any:
    try:
        import lemminflect
    except ImportError as exc:
        raise ImportError(
            "KeywordOracle needs the 'lemminflect' package for inflection-aware matching "
            f"(it ships its own data, no download): pip install '{LEMMINFLECT_REQUIREMENT}'"
        ) from exc
    return lemminflect


def _words(text: str) -> list[str]:
    """Lower-cased words: runs of letters and digits; punctuation, hyphens and apostrophes split words."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _rule_lemmas(word: str) -> set[str]:
    """A few regular English suffix rules, for words the lemmatiser's dictionary does not know."""
    out: set[str] = set()
    if len(word) <= 3 or not word.isalpha():
        return out
    if word.endswith("ies"):
        out.add(word[:-3] + "y")
    if word.endswith("es"):
        out.add(word[:-2])
    if word.endswith("s") and not word.endswith("ss"):
        out.add(word[:-1])
    if word.endswith("ied"):
        out.add(word[:-3] + "y")
    for suffix in ("ed", "ing"):
        if word.endswith(suffix):
            stem = word[: -len(suffix)]
            out.update({stem, stem + "e"})
            if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in "aeiouls":
                out.add(stem[:-1])  # stopped -> stop, hopping -> hop
    if word.endswith("ed"):
        out.add(word[:-1])  # frisbeed -> frisbee
    return {w for w in out if len(w) >= 2}


# Suppletive plurals that lemminflect lists as lemmas of their own.
_IRREGULAR_PLURALS = {"people": "person"}


@functools.lru_cache(maxsize=100_000)
def _word_forms(word: str) -> frozenset[str]:
    """The word and all its lemmas under every part of speech (dictionary, else rules)."""
    lemminflect = _lemminflect()
    forms = {word}
    known = lemminflect.getAllLemmas(word)
    if known:
        for lemmas in known.values():
            forms.update(lemma.casefold() for lemma in lemmas)
    else:
        for upos in ("NOUN", "VERB"):
            for lemmas in lemminflect.getAllLemmasOOV(word, upos).values():
                forms.update(lemma.casefold() for lemma in lemmas)
        forms.update(_rule_lemmas(word))
    if word in _IRREGULAR_PLURALS:
        forms.add(_IRREGULAR_PLURALS[word])
    forms.discard("")
    return frozenset(forms)


def _compile_keyword(keyword: str) -> tuple[frozenset[str], ...]:
    if not isinstance(keyword, str):
        raise TypeError(f"keywords must be strings, got {keyword!r}")
    return _compile_keyword_text(keyword)


@functools.lru_cache(maxsize=10_000)
def _compile_keyword_text(keyword: str) -> tuple[frozenset[str], ...]:
    words = _words(keyword)
    if not words:
        raise ValueError(f"keyword {keyword!r} contains no words")
    return tuple(_word_forms(w) for w in words)


def _covers(text: list[frozenset[str]], keyword: tuple[frozenset[str], ...]) -> bool:
    n = len(keyword)
    for start in range(len(text) - n + 1):
        if all(not text[start + j].isdisjoint(keyword[j]) for j in range(n)):
            return True
    return False


class CommonGenConcepts:
    """Reads the concept set from a CommonGen-style prompt ``"dog frisbee catch ="``.

    The concepts are the text between the start of the last line and the last ``marker`` (so few-shot prompts
    with one example per line work), split on whitespace, or on ``sep`` (e.g. ``","`` for multi-word
    concepts like ``"ice cream, dog ="``). ``marker=None`` takes the whole last line.
    """

    def __init__(self, marker: str | None = "=", sep: str | None = None) -> None:
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


class KeywordList:
    """Reads a prompt line that *is* a keyword list: ``"dog, frisbee, catch"`` (commas, for multi-word
    keywords such as ``"ice cream, dog"``) or ``"dog frisbee catch"`` (whitespace); a CommonGen-style trailing
    ``=`` is dropped. The ``{keywords}`` slot of a prompt template (:class:`dinado.text.PromptFormat`) reads
    lines the same way."""

    def __call__(self, prompt: str) -> list[str]:
        text = prompt.strip().removesuffix("=").strip()
        parts = text.split(",") if "," in text else text.split()
        return [p.strip() for p in parts if p.strip()]

    def __repr__(self) -> str:
        return "KeywordList()"


class KeywordOracle(OracleBase):
    """1.0 when the completion mentions every keyword (``soft=True``: the fraction mentioned).

    Matching is word-level, case-insensitive and inflection-aware: a text word matches a keyword word when
    the two share a lemma under any part of speech ("dogs"/"dog", "ran"/"run", "went"/"go"), so "dogma" does
    not match "dog". A multi-word keyword ("ice cream", "take off") needs its words adjacent and in order,
    each inflection-aware ("took off"). ``keywords`` is a list of strings for every sample, or a callable
    ``prompt -> list of strings`` giving each sample its own (see :class:`CommonGenConcepts`).
    """

    def __init__(
        self, keywords: Sequence[str] | Callable[[str], Sequence[str]], *, soft: bool = False
    ) -> None:
        _lemminflect()
        self.soft = bool(soft)
        if isinstance(keywords, str):
            raise TypeError(f"keywords must be a list of strings or a callable, got the string {keywords!r}")
        if callable(keywords):
            self.keywords: tuple[str, ...] | None = None
            self.from_prompt: Callable[[str], Sequence[str]] | None = keywords
        else:
            self.keywords = tuple(keywords)
            self.from_prompt = None
            if not self.keywords:
                raise ValueError("empty keyword set: give at least one keyword")
            for k in self.keywords:
                _compile_keyword(k)

    @classmethod
    def commongen(
        cls, *, marker: str | None = "=", sep: str | None = None, soft: bool = False
    ) -> KeywordOracle:
        """Keywords read from each CommonGen-style prompt ("dog frisbee catch =")."""
        return cls(CommonGenConcepts(marker=marker, sep=sep), soft=soft)

    def keywords_for(self, prompts: Sequence[str]) -> list[tuple[str, ...]]:
        """The keyword list each sample is judged against."""
        if self.keywords is not None:
            return [self.keywords] * len(prompts)
        out = []
        for i, prompt in enumerate(prompts):
            found = tuple(self.from_prompt(prompt))
            if not found:
                raise ValueError(f"empty keyword set for sample {i}: no keywords in the prompt {prompt!r}")
            out.append(found)
        return out

    def coverage(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[bool]]:
        """For each sample, whether each of its keywords is mentioned in the completion."""
        _check_batch(prompts, completions)
        _check_text(completions, "completions")
        if self.from_prompt is not None:
            _check_text(prompts, "prompts")
        result = []
        for keywords, completion in zip(self.keywords_for(prompts), completions, strict=True):
            text = [_word_forms(w) for w in _words(completion)]
            result.append([_covers(text, _compile_keyword(k)) for k in keywords])
        return result

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        values = []
        for covered in self.coverage(prompts, completions):
            values.append(sum(covered) / len(covered) if self.soft else float(all(covered)))
        return values

    def __repr__(self) -> str:
        if self.keywords is not None:
            what = repr(list(self.keywords))
        elif isinstance(self.from_prompt, CommonGenConcepts):
            what = repr(self.from_prompt)
        else:
            path = _import_path(self.from_prompt)
            what = repr(path) if path else getattr(self.from_prompt, "__qualname__", repr(self.from_prompt))
        return f"KeywordOracle({what}, soft={self.soft})"

    def to_config(self) -> dict[str, Any]:
        if self.keywords is not None:
            return {"type": "keywords", "keywords": list(self.keywords), "soft": self.soft}
        if isinstance(self.from_prompt, KeywordList):
            return {"type": "keywords", "from_prompt": "list", "soft": self.soft}
        if isinstance(self.from_prompt, CommonGenConcepts):
            parser = self.from_prompt
            return {
                "type": "keywords",
                "from_prompt": "commongen",
                "marker": parser.marker,
                "sep": parser.sep,
                "soft": self.soft,
            }
        path = _import_path(self.from_prompt)
        if path is None:
            raise ValueError(
                f"{self!r} cannot be written as a config: its keyword reader is not importable by name"
            )
        return {"type": "keywords", "from_prompt": path, "soft": self.soft}


# ----------------------------------------------------------------------------------------------------------
# regular expressions

_REGEX_FLAGS = {
    "ASCII": re.ASCII,
    "IGNORECASE": re.IGNORECASE,
    "MULTILINE": re.MULTILINE,
    "DOTALL": re.DOTALL,
    "VERBOSE": re.VERBOSE,
}
_FLAG_LETTERS = {"A": "ASCII", "I": "IGNORECASE", "M": "MULTILINE", "S": "DOTALL", "X": "VERBOSE"}


def _parse_flags(flags: Any) -> int:
    if isinstance(flags, bool):
        raise TypeError(f"regex flags must be names or an int, got {flags!r}")
    if isinstance(flags, int):
        unknown = int(flags) & ~functools.reduce(int.__or__, map(int, _REGEX_FLAGS.values()))
        if unknown:
            raise ValueError(f"unsupported regex flag bits {unknown}; supported: {', '.join(_REGEX_FLAGS)}")
        return int(flags)
    names = flags.split("|") if isinstance(flags, str) else list(flags)
    value = 0
    for raw in names:
        name = str(raw).strip().upper()
        name = _FLAG_LETTERS.get(name, name)
        if name not in _REGEX_FLAGS:
            raise ValueError(
                f"unknown regex flag {raw!r}; valid: {', '.join(_REGEX_FLAGS)} (or their letters A I M S X)"
            )
        value |= _REGEX_FLAGS[name]
    return value


def _flag_names(flags: int) -> list[str]:
    return [name for name, flag in _REGEX_FLAGS.items() if flags & flag]


class RegexOracle(OracleBase):
    """1.0 when the completion matches ``pattern`` (``mode="search"``: anywhere; ``"fullmatch"``: all of it).

    ``flags``: an int (``re.IGNORECASE | re.DOTALL``), a name, ``"IGNORECASE|DOTALL"`` or a list of names.
    ``strip=True`` strips surrounding whitespace from the completion first (decoded completions often begin
    with a space).
    """

    MODES = ("search", "fullmatch")

    def __init__(self, pattern: str, flags: Any = 0, mode: str = "search", *, strip: bool = False) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if not isinstance(pattern, str):
            raise TypeError(f"pattern must be a string, got {pattern!r}")
        self.flags = _parse_flags(flags)
        try:
            self.regex = re.compile(pattern, self.flags)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
        self.pattern = pattern
        self.mode = mode
        self.strip = bool(strip)

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        _check_batch(prompts, completions)
        _check_text(completions, "completions")
        match = self.regex.search if self.mode == "search" else self.regex.fullmatch
        return [float(match(c.strip() if self.strip else c) is not None) for c in completions]

    def __repr__(self) -> str:
        flags = "|".join(_flag_names(self.flags)) or "0"
        strip = ", strip=True" if self.strip else ""
        return f"RegexOracle({self.pattern!r}, flags={flags}, mode={self.mode!r}{strip})"

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "regex",
            "pattern": self.pattern,
            "flags": _flag_names(self.flags),
            "mode": self.mode,
            "strip": self.strip,
        }


# ----------------------------------------------------------------------------------------------------------
# a sequence classifier


class ClassifierOracle(OracleBase):
    """P(``label`` | completion) from a transformers sequence-classification model.

    ``soft=True``: the probability itself. ``threshold=t``: 1.0 when the probability is >= t, else 0.0.
    Neither: 1.0 when ``label`` is the most probable class (for multi-label models: probability >= 0.5).
    ``label`` is a class name from ``config.id2label``/``label2id`` or a class index. Probabilities are a
    softmax over the logits (a sigmoid for ``problem_type="multi_label_classification"``).
    ``include_prompt=True`` classifies prompt + completion instead of the completion alone. The model is
    put in eval mode, and scores in eval mode even if put back in training later (its modes are restored
    after each call); inputs are padded on the right with ``config.pad_token_id``. A model without one (GPT-2)
    is run one text at a time: set ``model.config.pad_token_id`` (for GPT-2, to the EOS id) to batch. An empty
    text is fed as one BOS/EOS token.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        label: str | int,
        *,
        threshold: float | None = None,
        soft: bool = False,
        batch_size: int = 32,
        max_length: int | None = None,
        include_prompt: bool = False,
        device: Any = None,
    ) -> None:
        import torch

        if soft and threshold is not None:
            raise ValueError("give threshold or soft=True, not both: soft returns the probability itself")
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
                raise TypeError(f"threshold must be a number in [0, 1] or None, got {threshold!r}")
            if not (math.isfinite(threshold) and 0 <= threshold <= 1):
                raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
            threshold = float(threshold)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        config = model.config
        self.num_labels = int(getattr(config, "num_labels", 0) or 0)
        if self.num_labels < 2:
            raise ValueError(
                f"ClassifierOracle needs a classification head with >= 2 labels; this model has "
                f"{self.num_labels} (a single output is a regression head)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = label
        self.label_index, self.label_name = self._resolve_label(config, label)
        self.threshold = threshold
        self.soft = bool(soft)
        self.batch_size = batch_size
        self.include_prompt = bool(include_prompt)
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.max_length_arg = max_length
        self.max_length = max_length if max_length is not None else self._default_max_length()
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else "cpu"
        self.device = torch.device(device)
        self.name_or_path: str | None = getattr(config, "name_or_path", None) or None
        self.tokenizer_name_or_path: str | None = getattr(tokenizer, "name_or_path", None) or None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        label: str | int,
        *,
        tokenizer: Any = None,
        threshold: float | None = None,
        soft: bool = False,
        batch_size: int = 32,
        max_length: int | None = None,
        include_prompt: bool = False,
        device: Any = None,
        **model_kwargs: Any,
    ) -> ClassifierOracle:
        """Load the model (and, unless given, its tokenizer) with the transformers Auto classes."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer_path = tokenizer or name_or_path
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path, **model_kwargs)
        if device is not None:
            model = model.to(device)
        oracle = cls(
            model,
            tokenizer,
            label,
            threshold=threshold,
            soft=soft,
            batch_size=batch_size,
            max_length=max_length,
            include_prompt=include_prompt,
            device=device,
        )
        oracle.name_or_path = name_or_path
        return oracle

    @staticmethod
    def _resolve_label(config: Any, label: str | int) -> tuple[int, str]:
        id2label = {int(i): str(name) for i, name in (getattr(config, "id2label", None) or {}).items()}
        names = {name: i for i, name in id2label.items()}
        names.update({str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()})
        num_labels = int(config.num_labels)
        if isinstance(label, bool):
            raise TypeError(f"label must be a class name or index, got {label!r}")
        if isinstance(label, int):
            if not 0 <= label < num_labels:
                raise ValueError(f"label index {label} is out of range: the model has {num_labels} labels")
            return label, id2label.get(label, str(label))
        if isinstance(label, str):
            if label in names:
                return names[label], label
            folded = [n for n in names if n.casefold() == label.casefold()]
            if len(folded) == 1:
                return names[folded[0]], folded[0]
            available = sorted(names, key=names.get)
            raise ValueError(
                f"unknown label {label!r}; the model's labels are {available} (or give an index 0..{num_labels - 1})"
            )
        raise TypeError(f"label must be a class name or index, got {label!r}")

    def _default_max_length(self) -> int | None:
        limits = []
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and tok_max < 1_000_000:
            limits.append(tok_max)
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(self.model.config, key, None)
            if isinstance(value, int) and value > 0:
                limits.append(value)
        return min(limits) if limits else None

    def _encode(self, texts: list[str]) -> list[list[int]]:
        kwargs: dict[str, Any] = {}
        if self.max_length is not None:
            kwargs = {"truncation": True, "max_length": self.max_length}
        rows = [list(ids) for ids in self.tokenizer(texts, **kwargs)["input_ids"]]
        fill = None
        for attr in ("bos_token_id", "eos_token_id", "cls_token_id", "pad_token_id"):
            fill = getattr(self.tokenizer, attr, None)
            if fill is not None:
                break
        for i, row in enumerate(rows):
            if not row:
                if fill is None:
                    raise ValueError(f"text {i} encodes to no tokens and the tokenizer has no BOS/EOS token")
                rows[i] = [int(fill)]
        return rows

    def _batches(self, rows: list[list[int]]) -> Iterable[list[int]]:
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths: little padding
        size = self.batch_size if getattr(self.model.config, "pad_token_id", None) is not None else 1
        for start in range(0, len(order), size):
            yield order[start : start + size]

    def logits(self, texts: Sequence[str]) -> Any:
        """The model's logits ``[len(texts), num_labels]`` (float32, on the CPU), in the order given."""
        import torch

        from .data import right_pad
        from .hf import eval_mode

        _check_text(texts, "texts")
        rows = self._encode(list(texts))
        pad = getattr(self.model.config, "pad_token_id", None)
        out = torch.zeros((len(rows), self.num_labels), dtype=torch.float32)
        with torch.inference_mode(), eval_mode(self.model):
            for batch in self._batches(rows):
                ids, mask = right_pad([rows[i] for i in batch], pad if pad is not None else 0)
                result = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
                out[torch.tensor(batch)] = result.logits.float().cpu()
        return out

    def probabilities(self, texts: Sequence[str]) -> list[float]:
        """P(label | text) for each text."""
        import torch

        logits = self.logits(texts)
        p = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        return p[:, self.label_index].tolist()

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        _check_batch(prompts, completions)
        _check_text(completions, "completions")
        if self.include_prompt:
            _check_text(prompts, "prompts")
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        else:
            texts = list(completions)
        if not texts:
            return []
        if self.soft:
            return self.probabilities(texts)
        if self.threshold is not None:
            return [float(p >= self.threshold) for p in self.probabilities(texts)]
        if self.multi_label:
            return [float(p >= 0.5) for p in self.probabilities(texts)]
        return [float(i == self.label_index) for i in self.logits(texts).argmax(dim=-1).tolist()]

    def __repr__(self) -> str:
        name = self.name_or_path or type(self.model).__name__
        if self.soft:
            rule = "soft=True"
        elif self.threshold is not None:
            rule = f"threshold={self.threshold}"
        else:
            rule = "argmax"
        prompt = ", include_prompt=True" if self.include_prompt else ""
        return f"ClassifierOracle({name!r}, label={self.label_name!r} (index {self.label_index}), {rule}{prompt})"

    def to_config(self) -> dict[str, Any]:
        if not self.name_or_path:
            raise ValueError(
                f"{self!r} cannot be written as a config: the model has no name or path "
                "(save it with save_pretrained and load it with ClassifierOracle.from_pretrained)"
            )
        config: dict[str, Any] = {"type": "classifier", "model": self.name_or_path}
        if self.tokenizer_name_or_path and self.tokenizer_name_or_path != self.name_or_path:
            config["tokenizer"] = self.tokenizer_name_or_path
        config.update(
            label=self.label,
            threshold=self.threshold,
            soft=self.soft,
            batch_size=self.batch_size,
            max_length=self.max_length_arg,
            include_prompt=self.include_prompt,
        )
        return config


# ----------------------------------------------------------------------------------------------------------
# composition


def _common_level(oracles: Sequence[Callable], who: str) -> str | None:
    levels = {lvl for lvl in map(_level_of, oracles) if lvl is not None}
    if len(levels) > 1:
        raise ValueError(
            f"{who} mixes text-level and token-level oracles; wrap the text ones in "
            "TextOracle(oracle, tokenizer) so that all of them read token ids"
        )
    return levels.pop() if levels else None


def _check_oracles(oracles: Sequence[Any], who: str) -> list[Callable]:
    if not oracles:
        raise ValueError(f"{who} needs at least one oracle")
    for i, o in enumerate(oracles):
        if not callable(o):
            raise TypeError(f"{who}: oracle {i} is not callable: {o!r}")
    return list(oracles)


def _evaluate(oracle: Callable, prompts: Sequence, completions: Sequence, alive: list[int]) -> list:
    """``(sample index, checked value)`` pairs for the samples in ``alive``."""
    values = call_oracle(oracle, [prompts[i] for i in alive], [completions[i] for i in alive])
    return list(zip(alive, values, strict=True))


class AllOf(OracleBase):
    """The product of the oracles' values: logical AND for 0/1 values, P(all) for independent soft values.

    Oracles are evaluated in order, each only on the samples still above 0, so put cheap ones first.
    """

    def __init__(self, *oracles: Callable) -> None:
        self.oracles = _check_oracles(oracles, "AllOf")
        self.level = _common_level(self.oracles, "AllOf")

    def __call__(self, prompts: list, completions: list) -> list[float]:
        _check_batch(prompts, completions)
        values = [1.0] * len(completions)
        for oracle in self.oracles:
            alive = [i for i, v in enumerate(values) if v > 0]
            if not alive:
                break
            for i, v in _evaluate(oracle, prompts, completions, alive):
                values[i] *= v
        return values

    def __repr__(self) -> str:
        return f"AllOf({', '.join(map(describe, self.oracles))})"

    def to_config(self) -> dict[str, Any]:
        return {"type": "all_of", "oracles": [_config_of(o) for o in self.oracles]}


class AnyOf(OracleBase):
    """``1 - prod(1 - v_i)``: logical OR for 0/1 values, P(any) for independent soft values."""

    def __init__(self, *oracles: Callable) -> None:
        self.oracles = _check_oracles(oracles, "AnyOf")
        self.level = _common_level(self.oracles, "AnyOf")

    def __call__(self, prompts: list, completions: list) -> list[float]:
        _check_batch(prompts, completions)
        misses = [1.0] * len(completions)  # prod(1 - v_i)
        for oracle in self.oracles:
            alive = [i for i, m in enumerate(misses) if m > 0]
            if not alive:
                break
            for i, v in _evaluate(oracle, prompts, completions, alive):
                misses[i] *= 1.0 - v
        return [1.0 - m for m in misses]

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(describe, self.oracles))})"

    def to_config(self) -> dict[str, Any]:
        return {"type": "any_of", "oracles": [_config_of(o) for o in self.oracles]}


class Not(OracleBase):
    """``1 - v``: e.g. "does not mention these words"."""

    def __init__(self, oracle: Callable) -> None:
        self.oracle = _check_oracles([oracle], "Not")[0]
        self.level = _level_of(oracle)

    def __call__(self, prompts: list, completions: list) -> list[float]:
        _check_batch(prompts, completions)
        return [1.0 - v for v in call_oracle(self.oracle, prompts, completions)]

    def __repr__(self) -> str:
        return f"Not({describe(self.oracle)})"

    def to_config(self) -> dict[str, Any]:
        return {"type": "not", "oracle": _config_of(self.oracle)}


class WeightedProduct(OracleBase):
    """``prod v_i ** w_i`` over ``[(oracle, weight), ...]``, weights finite and >= 0 (``0 ** 0 = 1``).

    A weight-0 term contributes 1 and is not evaluated. Samples already at 0 are not passed to later terms.
    """

    def __init__(self, terms: Iterable[tuple[Callable, float]]) -> None:
        self.terms: list[tuple[Callable, float]] = []
        for i, term in enumerate(terms):
            try:
                oracle, weight = term
            except (TypeError, ValueError):
                raise TypeError(
                    f"WeightedProduct: term {i} must be an (oracle, weight) pair, got {term!r}"
                ) from None
            if not callable(oracle):
                raise TypeError(f"WeightedProduct: the oracle of term {i} is not callable: {oracle!r}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise TypeError(f"WeightedProduct: the weight of term {i} must be a number, got {weight!r}")
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(
                    f"WeightedProduct: the weight of term {i} must be finite and >= 0, got {weight!r}"
                )
            self.terms.append((oracle, float(weight)))
        if not self.terms:
            raise ValueError("WeightedProduct needs at least one (oracle, weight) term")
        self.level = _common_level([o for o, _ in self.terms], "WeightedProduct")

    def __call__(self, prompts: list, completions: list) -> list[float]:
        _check_batch(prompts, completions)
        values = [1.0] * len(completions)
        for oracle, weight in self.terms:
            if weight == 0:
                continue
            alive = [i for i, v in enumerate(values) if v > 0]
            if not alive:
                break
            for i, v in _evaluate(oracle, prompts, completions, alive):
                values[i] *= v**weight
        return values

    def __repr__(self) -> str:
        terms = ", ".join(f"({describe(o)}, {w:g})" for o, w in self.terms)
        return f"WeightedProduct([{terms}])"

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "weighted_product",
            "oracles": [{"oracle": _config_of(o), "weight": w} for o, w in self.terms],
        }


# ----------------------------------------------------------------------------------------------------------
# configs


def _check_keys(config: Mapping, required: set[str], optional: set[str], where: str) -> None:
    valid = required | optional | {"type"}
    for key in config:
        if key not in valid:
            raise ValueError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(valid))}")
    missing = sorted(required - set(config))
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r}; required keys: {', '.join(sorted(required))}")


def _build_keywords(c: Mapping, where: str) -> KeywordOracle:
    _check_keys(c, set(), {"keywords", "from_prompt", "marker", "sep", "soft"}, where)
    soft = c.get("soft", False)
    if ("keywords" in c) == ("from_prompt" in c):
        raise ValueError(f"{where}: give exactly one of 'keywords' (a list) or 'from_prompt'")
    if "keywords" in c:
        if "marker" in c or "sep" in c:
            raise ValueError(f"{where}: 'marker' and 'sep' go with from_prompt: commongen")
        keywords = c["keywords"]
        if isinstance(keywords, str) or not isinstance(keywords, Sequence):
            raise ValueError(f"{where}: 'keywords' must be a list of strings, got {keywords!r}")
        return KeywordOracle(list(keywords), soft=soft)
    source = c["from_prompt"]
    if source == "commongen":
        return KeywordOracle.commongen(marker=c.get("marker", "="), sep=c.get("sep"), soft=soft)
    if "marker" in c or "sep" in c:
        raise ValueError(f"{where}: 'marker' and 'sep' go with from_prompt: commongen")
    if source == "list":
        return KeywordOracle(KeywordList(), soft=soft)
    if not isinstance(source, str):
        raise ValueError(f"{where}: 'from_prompt' must be 'commongen', 'list' or 'package.module:function'")
    return KeywordOracle(load_callable(source), soft=soft)


def _build_regex(c: Mapping, where: str) -> RegexOracle:
    _check_keys(c, {"pattern"}, {"flags", "mode", "strip"}, where)
    return RegexOracle(
        c["pattern"], flags=c.get("flags", 0), mode=c.get("mode", "search"), strip=c.get("strip", False)
    )


def _build_callable(c: Mapping, where: str) -> CallableOracle:
    _check_keys(c, {"path"}, {"on"}, where)
    return CallableOracle(c["path"], on=c.get("on", "text"))


def _build_classifier(c: Mapping, where: str) -> ClassifierOracle:
    options = {"threshold", "soft", "batch_size", "max_length", "include_prompt", "device"}
    _check_keys(c, {"model", "label"}, options | {"tokenizer"}, where)
    kwargs = {k: c[k] for k in options if k in c}
    return ClassifierOracle.from_pretrained(c["model"], c["label"], tokenizer=c.get("tokenizer"), **kwargs)


def _children(c: Mapping, key: str, where: str) -> list:
    children = c[key]
    if isinstance(children, (str, Mapping)) or not isinstance(children, Sequence):
        raise ValueError(f"{where}: {key!r} must be a list, got {children!r}")
    return list(children)


def _build_all_of(c: Mapping, where: str) -> AllOf:
    _check_keys(c, {"oracles"}, set(), where)
    children = _children(c, "oracles", where)
    return AllOf(*[_from_config(o, f"{where}.oracles[{i}]") for i, o in enumerate(children)])


def _build_any_of(c: Mapping, where: str) -> AnyOf:
    _check_keys(c, {"oracles"}, set(), where)
    children = _children(c, "oracles", where)
    return AnyOf(*[_from_config(o, f"{where}.oracles[{i}]") for i, o in enumerate(children)])


def _build_not(c: Mapping, where: str) -> Not:
    _check_keys(c, {"oracle"}, set(), where)
    return Not(_from_config(c["oracle"], f"{where}.oracle"))


def _build_weighted_product(c: Mapping, where: str) -> WeightedProduct:
    _check_keys(c, {"oracles"}, set(), where)
    terms = []
    for i, term in enumerate(_children(c, "oracles", where)):
        here = f"{where}.oracles[{i}]"
        if not isinstance(term, Mapping):
            raise ValueError(f"{here}: expected {{'oracle': {{...}}, 'weight': w}}, got {term!r}")
        _check_keys(term, {"oracle", "weight"}, set(), here)
        terms.append((_from_config(term["oracle"], f"{here}.oracle"), term["weight"]))
    return WeightedProduct(terms)


def _build_tv(c: Mapping, where: str) -> OracleBase:
    from .tasks.formality import TVOracle  # the task module imports this one

    _check_keys(c, {"lang"}, {"target", "neutral"}, where)
    try:
        return TVOracle(c["lang"], target=c.get("target", "formal"), neutral=c.get("neutral", 0.0))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


_BUILDERS: dict[str, Callable[[Mapping, str], OracleBase]] = {
    "keywords": _build_keywords,
    "regex": _build_regex,
    "callable": _build_callable,
    "classifier": _build_classifier,
    "all_of": _build_all_of,
    "any_of": _build_any_of,
    "not": _build_not,
    "weighted_product": _build_weighted_product,
    "tv": _build_tv,
}


def _from_config(config: Any, where: str) -> OracleBase:
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: an oracle config must be a mapping with a 'type', got {config!r}")
    if "type" not in config:
        raise ValueError(f"{where}: missing key 'type'; valid types: {', '.join(_BUILDERS)}")
    kind = config["type"]
    if kind not in _BUILDERS:
        raise ValueError(f"{where}: unknown oracle type {kind!r}; valid types: {', '.join(_BUILDERS)}")
    return _BUILDERS[kind](config, where)


def oracle_from_config(config: Mapping[str, Any]) -> OracleBase:
    """Build an oracle from a plain dict (e.g. parsed YAML): ``{"type": "keywords", "keywords": [...]}``.

    Types: keywords, regex, callable, classifier, all_of, any_of, not, weighted_product, tv (German/Spanish
    formal or informal address, :class:`dinado.tasks.formality.TVOracle`); see docs/oracles.md.
    The oracles read text; ``as_token_oracle(oracle, tokenizer)`` makes one that reads token ids.
    """
    return _from_config(config, "oracle config")
