"""Keywords: :class:`KeywordOracle`, inflection-aware word matching (lemmas, word forms) and keyword readers.

Keywords are one list for every sample, or read from each prompt by a callable ``prompt -> keywords``:
:class:`KeywordList` (a prompt line that is a keyword list), a task's reader (CommonGen's concept sets:
:class:`dinado.tasks.commongen.CommonGenConcepts`) or any function given by import path.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .base import OracleBase
from .registry import check_keys, import_path, load_callable, register_oracle

LEMMINFLECT_REQUIREMENT = "lemminflect>=0.2.3,<0.3"

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

    def to_config(self) -> dict[str, Any]:
        return {"from_prompt": "list"}


class KeywordOracle(OracleBase):
    """1.0 when the completion mentions every keyword (``soft=True``: the fraction mentioned).

    Matching is word-level, case-insensitive and inflection-aware: a text word matches a keyword word when
    the two share a lemma under any part of speech ("dogs"/"dog", "ran"/"run", "went"/"go"), so "dogma" does
    not match "dog". A multi-word keyword ("ice cream", "take off") needs its words adjacent and in order,
    each inflection-aware ("took off"). ``keywords`` is a list of strings for every sample, or a callable
    ``prompt -> list of strings`` giving each sample its own (:class:`KeywordList`, CommonGen's
    :func:`dinado.tasks.commongen.coverage_oracle`). A reader with a ``to_config()`` (the ``from_prompt``
    keys of a keywords config) is written as that; another one by its import path.
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

    @property
    def text_inputs(self) -> tuple[str, ...]:
        return ("completions", "prompts") if self.from_prompt is not None else ("completions",)

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
        self._check_inputs(prompts, completions)
        return self._coverage(prompts, completions)

    def _coverage(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[bool]]:
        result = []
        for keywords, completion in zip(self.keywords_for(prompts), completions, strict=True):
            text = [_word_forms(w) for w in _words(completion)]
            result.append([_covers(text, _compile_keyword(k)) for k in keywords])
        return result

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        values = []
        for covered in self._coverage(prompts, completions):
            values.append(sum(covered) / len(covered) if self.soft else float(all(covered)))
        return values

    def __repr__(self) -> str:
        if self.keywords is not None:
            what = repr(list(self.keywords))
        elif hasattr(self.from_prompt, "to_config"):
            what = repr(self.from_prompt)
        else:
            path = import_path(self.from_prompt)
            what = repr(path) if path else getattr(self.from_prompt, "__qualname__", repr(self.from_prompt))
        return f"KeywordOracle({what}, soft={self.soft})"

    def to_config(self) -> dict[str, Any]:
        if self.keywords is not None:
            return {"type": "keywords", "keywords": list(self.keywords), "soft": self.soft}
        if hasattr(self.from_prompt, "to_config"):
            return {"type": "keywords", **self.from_prompt.to_config(), "soft": self.soft}
        path = import_path(self.from_prompt)
        if path is None:
            raise ValueError(
                f"{self!r} cannot be written as a config: its keyword reader is not importable by name"
            )
        return {"type": "keywords", "from_prompt": path, "soft": self.soft}


# `from_prompt: commongen` names CommonGen's concept reader, which lives with its task; it is loaded by import
# path like any `from_prompt: package.module:function` reader (the core imports no task statically), and
# built with the config's `marker` and `sep`
COMMONGEN_READER = "dinado.tasks.commongen:CommonGenConcepts"


def _build_keywords(c: Mapping, where: str) -> KeywordOracle:
    check_keys(c, set(), {"keywords", "from_prompt", "marker", "sep", "soft"}, where)
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
        reader = load_callable(COMMONGEN_READER)(marker=c.get("marker", "="), sep=c.get("sep"))
        return KeywordOracle(reader, soft=soft)
    if "marker" in c or "sep" in c:
        raise ValueError(f"{where}: 'marker' and 'sep' go with from_prompt: commongen")
    if source == "list":
        return KeywordOracle(KeywordList(), soft=soft)
    if not isinstance(source, str):
        raise ValueError(f"{where}: 'from_prompt' must be 'commongen', 'list' or 'package.module:function'")
    return KeywordOracle(load_callable(source), soft=soft)


register_oracle("keywords", _build_keywords)
