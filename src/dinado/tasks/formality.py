"""CoCoA-MT formality data, and a rule-based German/Spanish T-V (formal/informal address) check and oracle.

CoCoA-MT (Nadejde et al., Findings of NAACL 2022; CDLA-Sharing-1.0) holds English segments from three
domains (topical_chat, telephony; call_center in test only), each with two professional translations: one
addressing the reader formally, one informally, with minimal changes between them. Pairs: en-de, en-es,
en-fr, en-hi, en-it, en-ja, en-nl, en-pt (European Portuguese, file tag ``en-ptpt``); 400 train segments
(en-ja 1,000) and about 600 test segments per pair. ``*.annotated.*`` files mark the formality-bearing
phrases with ``[F]...[/F]``. Some train pairs have identical formal and informal references (no address);
all test pairs differ. File names vary by pair and split (``....en-de.en`` vs ``....en-de`` for sources,
``.formal.de`` vs ``.formal`` for references): :func:`load_cocoa` finds them by pattern.

T-V rules of :func:`tv_register` (text -> "formal", "informal" or None; cues of both registers -> None):

- German. Formal: capitalised Sie/Ihnen/Ihr/Ihre/Ihren/Ihrem/Ihrer/Ihres (case-sensitive), counted only
  when not sentence-initial (after ``.!?:;…``, a line break or the text start, skipping quotes and
  brackets): there "Sie"/"Ihr" may be she/they/her/their, so "Sie sind nett." is undecided while "Können
  Sie mir helfen?" is formal. Informal: du/dich/dir/dein*/euch/euer*/eure* in any case; lower-case "ihr"
  is read as her/their unless next to a 2nd-person-plural-only verb ("habt ihr", "ihr seid"). "Du meine
  Güte" is an interjection, not address. Known limits: formal texts whose only cue is sentence-initial
  stay undecided (most of the ~3% of formal references left undecided), so does address by an imperative
  without pronoun ("Hab viel Spaß"); sloppy casing in generated text ("sie" for formal you, "Sie" for
  she/they inside a sentence) is taken at face value.
- Spanish (peninsular: CoCoA-MT's informal plural is vosotros, so "ustedes" counts as formal). Formal:
  usted/ustedes/Ud./Uds./Vd./Vds., a few formal imperatives (dígame, cuénteme, oiga, ...) and the formal
  "you know" fillers "ya sabe", "sabe lo que ...", "¿sabe?". Informal: tú/ti/contigo/te/tu/tus/tuyo*/vos/
  vosotros/os/vuestro*, a lexicon of unambiguous 2nd-person-singular forms of common verbs (puedes,
  quieres, tienes, estás, has, vas, fuiste, podrías, ...) and endings: gerund/infinitive + "te"
  (preguntándote, ayudarte), preterite -aste/-iste (minus nouns and 3rd-person forms such as contraste,
  triste, existe), vosotros forms in -áis/-éis. Known limits: formal Spanish mostly drops "usted" and uses
  su/le and 3rd-person verbs, which are also he/she/they, so they are not cues and formal coverage is low
  (a quarter of formal references); informal subjunctives ending in -es/-as (que pases) are not cues
  (plural nouns end the same); quoted or reported address ("dije: oye, ...") counts as address.

Measured on the references whose formal and informal versions differ (accuracy = correct among decided,
coverage = share decided). The rules were chosen on train only; test was scored once afterwards.

- de, train: formal refs 1.000 / 0.971 (n=377), informal refs 1.000 / 1.000 (n=377); 22 of 23 identical
  pairs undecided.
- de, test: formal refs 1.000 / 0.975 (n=600), informal refs 1.000 / 0.993 (n=600).
- es, train: formal refs 1.000 / 0.256 (n=351), informal refs 1.000 / 0.946 (n=351); 46 of 49 identical
  pairs undecided (the other 3 do hold address: "vuestra conversación", "usted mismo", "tu madre").
- es, test: formal refs 0.993 / 0.252 (n=600), informal refs 1.000 / 0.957 (n=600).

Alternatives measured on train (formal acc/cov, informal acc/cov, identical pairs undecided): German
counting sentence-initial Sie forms too: 1.000/0.997, 1.000/0.976, 19/23; counting sentence-initial "Sie" +
a verb in -en: 1.000/0.987, 1.000/0.984, 20/23; majority vote on conflicting cues, lower-case "ihr" with
2nd-person-plural verbs, a 2nd-person-singular verb lexicon: no change. Spanish pronouns only:
1.000/0.148, 1.000/0.675, 46/49; + 9 common 2sg verbs (puedes, quieres, ...): informal 1.000/0.852; + the
full verb lexicon: 1.000/0.937; + the formal fillers: formal 1.000/0.251 (informal 0.932); + imperatives,
clitic and preterite endings: the numbers above; also taking su/sus/suyo/le/les as formal when no informal
cue is present: 1.000/0.732, 0.994/0.952, 40/49 (not used: these are also his/her/their/him).
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..oracles import OracleBase, register_oracle
from ..oracles.registry import check_keys

SPLITS = ("train", "test")
REGISTERS = ("formal", "informal")
_VARIANTS = ("annotated", "feminine")
# formality-control.{split}.{domain}.{tag}[.en | .formal|.informal [.annotated|.feminine] [.xx]]
# tag is "en-de", "en-es", ..., or "en-ptpt" (European Portuguese, in the en-pt folder)
_FILE = re.compile(
    r"formality-control\.(?P<split>[a-z]+)\.(?P<domain>[a-z_]+)\.(?P<tag>en-[a-z]+)(?P<rest>(?:\.[a-z]+)*)"
)


@dataclass
class FormalityExample:
    """One English source segment with its formal and informal reference translations."""

    source: str
    formal: str
    informal: str
    domain: str


def strip_markers(text: str) -> str:
    """Remove the ``[F]``/``[/F]`` formality markers of the ``*.annotated.*`` files."""
    return text.replace("[F]", "").replace("[/F]", "")


def _role(rest: str) -> tuple[str, str | None] | None:
    """What a file holds, from the suffix after the tag: ``("source", None)``, ``("formal", "annotated")``..."""
    parts = rest.split(".")[1:]
    if not parts or parts == ["en"]:
        return "source", None
    if parts[0] not in REGISTERS:
        return None
    register, tail, variant = parts[0], parts[1:], None
    if tail and tail[0] in _VARIANTS:
        variant, tail = tail[0], tail[1:]
    return (register, variant) if len(tail) <= 1 else None  # at most a language suffix (".de")


def _scan(directory: Path, split: str) -> dict[str, tuple[str, dict[tuple[str, str | None], Path]]]:
    """``domain -> (tag, {(role, variant): path})`` for the CoCoA-MT files of ``split`` in ``directory``."""
    found: dict[str, tuple[str, dict[tuple[str, str | None], Path]]] = {}
    for path in sorted(directory.iterdir()):
        m = _FILE.fullmatch(path.name)
        if m is None or m["split"] != split or not path.is_file():
            continue
        role = _role(m["rest"])
        if role is None:
            continue
        tag, files = found.setdefault(m["domain"], (m["tag"], {}))
        if role in files:
            raise ValueError(
                f"{files[role]} and {path} both look like the {' '.join(filter(None, role))} file"
            )
        files[role] = path
    return found


def _read_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file, split on newlines only (a segment may hold other Unicode line breaks)."""
    text = path.read_text(encoding="utf-8-sig")
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []


def load_cocoa(
    root: str | os.PathLike,
    pair: str,
    split: str,
    domains: str | Iterable[str] | None = None,
    annotated: bool = False,
) -> list[FormalityExample]:
    """Read CoCoA-MT segments from ``root`` (the ``CoCoA-MT`` folder of the release).

    ``pair`` is a folder under ``root/split`` ("en-de", "en-es", ..., "en-pt"), ``split`` is "train" or
    "test". ``domains`` (default: all found, in sorted order) picks some of telephony, topical_chat and, in
    test, call_center; examples come domain by domain in file order. ``annotated=True`` gives the references
    with their ``[F]...[/F]`` markers (:func:`strip_markers` removes them).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CoCoA-MT directory {root} not found")
    if split not in SPLITS:
        found = [s for s in _subdirs(root) if s in SPLITS] or _subdirs(root)
        raise ValueError(
            f"unknown CoCoA-MT split {split!r}: choose one of {', '.join(SPLITS)} "
            f"(found in {root}: {', '.join(found) or 'nothing'})"
        )
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"CoCoA-MT split directory {split_dir} not found")
    pairs = _subdirs(split_dir)
    if pair not in pairs:  # a folder name, not a path
        raise ValueError(
            f"unknown CoCoA-MT language pair {pair!r} for {split}: available in {split_dir}: "
            f"{', '.join(pairs) or 'none'}"
        )
    pair_dir = split_dir / pair
    found = _scan(pair_dir, split)
    if not found:
        raise FileNotFoundError(f"no formality-control.{split}.* files in {pair_dir}")
    if domains is None:
        chosen = sorted(found)
    else:
        chosen = [domains] if isinstance(domains, str) else list(domains)
        if not chosen:
            raise ValueError("domains is empty: give at least one domain, or None for all")
        for domain in chosen:
            if domain not in found:
                raise ValueError(
                    f"unknown domain {domain!r} for {pair} {split}: available: {', '.join(sorted(found))}"
                )
    variant = "annotated" if annotated else None
    examples: list[FormalityExample] = []
    for domain in chosen:
        tag, files = found[domain]
        stem = pair_dir / f"formality-control.{split}.{domain}.{tag}"
        paths = {}
        for role in ("source", "formal", "informal"):
            key = (role, None if role == "source" else variant)
            if key not in files:
                suffix = (
                    "[.en]" if role == "source" else f".{role}{'.annotated' if annotated else ''}[.<lang>]"
                )
                raise FileNotFoundError(
                    f"missing CoCoA-MT {' '.join(filter(None, key))} file: {stem}{suffix}"
                )
            paths[role] = files[key]
        lines = {role: _read_lines(path) for role, path in paths.items()}
        n = len(lines["source"])
        for role in ("formal", "informal"):
            if len(lines[role]) != n:
                raise ValueError(
                    f"{paths['source']} has {n} lines but {paths[role]} has {len(lines[role])}: "
                    "the files of a domain must be parallel"
                )
        for source, formal, informal in zip(lines["source"], lines["formal"], lines["informal"], strict=True):
            examples.append(FormalityExample(source, formal, informal, domain))
    return examples


# ----------------------------------------------------------------------------------------------------------
# the T-V check

LANGUAGES = ("de", "es")
_WORD = re.compile(r"[^\W\d_]+")
_SENTENCE_END = ".!?:;…\n"
_OPENERS = " \t\r\"'„“”»«‚‘’‹›([{-–—*¿¡"

# German. Formal: the capitalised Sie forms; informal: du/dein/euch/euer forms (any case).
_DE_FORMAL = frozenset({"Sie", "Ihnen", "Ihr", "Ihre", "Ihren", "Ihrem", "Ihrer", "Ihres"})
_DE_INFORMAL = frozenset(
    "du dich dir dein deine deinen deinem deiner deines deins euch euer eure euren eurem eurer eures".split()
)
# 2nd person plural verb forms that are not also 3rd person singular ("habt", not "kommt"): next to one of
# these, "ihr"/"Ihr" is the informal plural pronoun, not "her"/"their"/formal "your".
_DE_2PL_VERBS = frozenset(
    "seid habt wart hattet hättet wärt wäret könnt könntet wollt wolltet müsst müsstet sollt solltet "
    "dürft dürftet wisst wusstet werdet würdet möchtet mögt".split()
)
_DE_IDIOMS = re.compile(r"\bdu\s+(?:meine\s+güte|lieber\s+(?:gott|himmel))\b", re.IGNORECASE)

# Spanish. Formal: usted and its abbreviations, a few formal imperatives and the formal "you know" fillers.
_ES_FORMAL = frozenset(
    "usted ustedes ud uds vd vds dígame dígamelo cuénteme hágame déjeme avíseme oiga".split()
)
_ES_FORMAL_PHRASES = re.compile(r"\bya\s+sabe\b|\bsabe\s+lo\s+que\b|\bsabe\s*\?", re.IGNORECASE)
# Informal: tú/vosotros (and voseo "vos") pronouns and possessives, and unambiguous 2nd person verb forms of
# common verbs (present, imperfect, preterite, future, conditional, subjunctive) and imperatives.
_ES_INFORMAL = frozenset(
    """
    tú ti contigo te tu tus tuyo tuya tuyos tuyas vos vosotros vosotras os vuestro vuestra vuestros vuestras
    eres estás tienes puedes quieres sabes haces vas has dices crees piensas necesitas sientes conoces ves
    das vienes sigues prefieres pareces quedas llevas buscas hablas trabajas vives juegas miras escuchas usas
    utilizas opinas recuerdas entiendes debes comes lees escribes sueles vuelves encuentras gustas imaginas
    estabas tenías podías querías sabías eras ibas hacías pensabas decías vivías jugabas solías
    fuiste tuviste hiciste dijiste estuviste pudiste quisiste supiste viniste diste viviste conociste
    pensaste hablaste llegaste compraste jugaste empezaste terminaste leíste escuchaste trabajaste estudiaste
    podrías querrías tendrías harías serías estarías deberías sabrías dirías irías
    tendrás podrás serás estarás harás irás verás sabrás
    tengas puedas quieras sepas hagas vayas seas estés tuvieras pudieras fueras quisieras hubieras estuvieras
    dime dímelo cuéntame hazme déjame avísame oye sois
    """.split()
)
# words that end like a 2nd person form but are not one (nouns, adjectives, 3rd person of -astar/-istir verbs)
_ES_NOT_PRETERITE = frozenset(
    "desgaste malgaste engaste contraste traste aplaste devaste subaste emplaste baste "
    "triste chiste viste embiste reviste despiste quiste alpiste inviste".split()
)
_ES_NOT_CLITIC_ENDINGS = ("ierte", "parte", "carte", "harte", "baluarte", "estandarte", "inserte", "injerte")


def _es_informal_form(word: str) -> bool:
    """Informal by its ending: verb + "te" clitic, 2nd person preterite, vosotros present forms."""
    if word.endswith(("ándote", "iéndote", "yéndote")):  # gerund + te: "preguntándote"
        return True
    if (
        len(word) >= 7
        and word.endswith(("arte", "erte", "irte"))
        and not word.endswith(_ES_NOT_CLITIC_ENDINGS)
    ):
        return True  # infinitive + te: "ayudarte", "conocerte", "convertirte"
    if len(word) >= 6 and word.endswith(("aste", "iste")) and word not in _ES_NOT_PRETERITE:
        return not word.endswith(("siste", "xiste"))  # "tomaste", "aprendiste"; not "consiste", "existe"
    if word.endswith(("asteis", "isteis")):  # "conocisteis"
        return True
    return len(word) >= 5 and word.endswith(("áis", "éis")) and word != "dieciséis"  # "habláis", "tenéis"


def _check_lang(lang: str) -> None:
    if lang not in LANGUAGES:
        raise ValueError(
            f"unsupported language {lang!r} for the T-V check: supported: {', '.join(LANGUAGES)}"
        )


def _sentence_initial(text: str, start: int) -> bool:
    j = start - 1
    while j >= 0 and text[j] in _OPENERS:
        j -= 1
    return j < 0 or text[j] in _SENTENCE_END


def _de_cues(text: str) -> tuple[list[str], list[str]]:
    text = _DE_IDIOMS.sub(lambda m: " " * len(m.group()), text)  # "Du meine Güte!" addresses no one
    words = list(_WORD.finditer(text))
    formal: list[str] = []
    informal: list[str] = []
    for k, m in enumerate(words):
        word = m.group()
        if word in ("ihr", "Ihr"):
            neighbours = {words[j].group().lower() for j in (k - 1, k + 1) if 0 <= j < len(words)}
            if neighbours & _DE_2PL_VERBS:  # "habt ihr", "Ihr seid"
                informal.append(word)
                continue
        if word in _DE_FORMAL:
            if not _sentence_initial(text, m.start()):  # sentence-initial: also she/they/her/their
                formal.append(word)
        elif word.lower() in _DE_INFORMAL:
            informal.append(word)
    return formal, informal


def _es_cues(text: str) -> tuple[list[str], list[str]]:
    formal = [m.group() for m in _ES_FORMAL_PHRASES.finditer(text)]
    informal: list[str] = []
    for word in _WORD.findall(text):
        lower = word.lower()
        if lower in _ES_FORMAL:
            formal.append(word)
        elif lower in _ES_INFORMAL or _es_informal_form(lower):
            informal.append(word)
    return formal, informal


def tv_cues(text: str, lang: str) -> dict[str, list[str]]:
    """The words (and phrases) that mark ``text`` as formal or informal address: ``{"formal": [...], ...}``."""
    _check_lang(lang)
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    formal, informal = (_de_cues if lang == "de" else _es_cues)(text)
    return {"formal": formal, "informal": informal}


def tv_register(text: str, lang: str) -> str | None:
    """Return "formal", "informal", or None (no T-V cue, or cues of both registers); rules: module doc."""
    cues = tv_cues(text, lang)
    if cues["formal"] and cues["informal"]:
        return None
    if cues["formal"]:
        return "formal"
    return "informal" if cues["informal"] else None


def tv_accuracy(texts: Sequence[str], labels: Sequence[str], lang: str) -> dict[str, Any]:
    """How :func:`tv_register` agrees with gold ``labels`` ("formal"/"informal"), one per text.

    ``accuracy``: share correct among the decided texts (None when none is decided); ``coverage``: share
    decided; ``strict_accuracy``: share correct among all texts; plus the counts.
    """
    _check_lang(lang)
    texts, labels = list(texts), list(labels)
    if len(texts) != len(labels):
        raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
    if not texts:
        raise ValueError("no texts to score")
    for i, label in enumerate(labels):
        if label not in REGISTERS:
            raise ValueError(f"labels[{i}] is {label!r}: labels must be 'formal' or 'informal'")
    predicted = [tv_register(t, lang) for t in texts]
    decided = sum(p is not None for p in predicted)
    correct = sum(p == y for p, y in zip(predicted, labels, strict=True))
    return {
        "n": len(texts),
        "decided": decided,
        "correct": correct,
        "wrong": decided - correct,
        "undecided": len(texts) - decided,
        "accuracy": correct / decided if decided else None,
        "coverage": decided / len(texts),
        "strict_accuracy": correct / len(texts),
    }


class TVOracle(OracleBase):
    """1.0 when the completion addresses the reader in the ``target`` register ("formal"/"informal"), 0.0
    when in the other one, ``neutral`` when :func:`tv_register` cannot tell (no address, or both).

    ``to_config()`` gives ``{"type": "tv", "lang": ..., "target": ..., "neutral": ...}``, which
    :func:`dinado.oracles.oracle_from_config` (and the CLI's ``--oracle``) builds back: this module registers
    the ``tv`` type when imported (and the registry imports it on the type's first use).
    """

    level = "text"
    TARGETS = REGISTERS

    def __init__(self, lang: str, target: str = "formal", neutral: float = 0.0) -> None:
        _check_lang(lang)
        if target not in self.TARGETS:
            raise ValueError(f"target must be 'formal' or 'informal', got {target!r}")
        if isinstance(neutral, bool) or not isinstance(neutral, (int, float)):
            raise TypeError(f"neutral must be a number in [0, 1], got {neutral!r}")
        if not math.isfinite(neutral) or not 0 <= neutral <= 1:
            raise ValueError(f"neutral must be finite and in [0, 1], got {neutral!r}")
        self.lang = lang
        self.target = target
        self.neutral = float(neutral)

    def _score(self, prompts: list[str], completions: list[str]) -> list[float]:
        values = []
        for completion in completions:
            register = tv_register(completion, self.lang)
            values.append(self.neutral if register is None else float(register == self.target))
        return values

    def __repr__(self) -> str:
        return f"TVOracle(lang={self.lang!r}, target={self.target!r}, neutral={self.neutral:g})"

    def to_config(self) -> dict[str, Any]:
        return {"type": "tv", "lang": self.lang, "target": self.target, "neutral": self.neutral}


def _build_tv(c: Mapping, where: str) -> TVOracle:
    check_keys(c, {"lang"}, {"target", "neutral"}, where)
    try:
        return TVOracle(c["lang"], target=c.get("target", "formal"), neutral=c.get("neutral", 0.0))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


register_oracle("tv", _build_tv)


# ----------------------------------------------------------------------------------------------------------
# a trained formality classifier


def train_formality_classifier(
    root: str | os.PathLike,
    pair: str,
    output_dir: str | os.PathLike | None = None,
    *,
    validation_fraction: float = 0.0,
    domains: str | Iterable[str] | None = None,
    seed: int = 0,
    **kwargs: Any,
):
    """Train a formal/informal classifier on the CoCoA-MT train split of ``pair`` (e.g. "en-de").

    Every formal reference is a "formal" text and every informal one an "informal" text
    (``label_names=("informal", "formal")``); segments whose two references are identical (no address) are
    left out. ``validation_fraction`` of the segments (both references of a segment on the same side, drawn
    with ``seed``) are held out of training and scored as validation; the test split is never read.
    ``root`` is the ``CoCoA-MT`` folder (as for :func:`load_cocoa`); ``output_dir``, ``seed`` and ``kwargs``
    go to :func:`dinado.classifier.train_classifier`, whose :class:`~dinado.classifier.ClassifierResult` is
    returned. Use it as an oracle with ``result.oracle("formal", soft=True)`` or
    ``ClassifierOracle.from_pretrained(output_dir, "formal", ...)``; measured accuracy: docs/oracles.md.
    """
    import random

    from ..classifier import train_classifier

    if isinstance(validation_fraction, bool) or not isinstance(validation_fraction, (int, float)):
        raise TypeError(f"validation_fraction must be a number in [0, 1), got {validation_fraction!r}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    for key in ("label_names", "validation"):
        if key in kwargs:
            raise TypeError(f"train_formality_classifier sets {key} itself")
    examples = [e for e in load_cocoa(root, pair, "train", domains=domains) if e.formal != e.informal]
    if not examples:
        raise ValueError(f"no CoCoA-MT {pair} train segment has distinct formal and informal references")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = round(validation_fraction * len(examples))
    if validation_fraction > 0 and not 1 <= n_val < len(examples):
        raise ValueError(
            f"validation_fraction={validation_fraction} holds out {n_val} of {len(examples)} segments; "
            "choose a fraction that leaves segments on both sides"
        )
    held_out = set(order[:n_val])

    def labelled(indices: list[int]) -> tuple[list[str], list[str]]:
        texts, labels = [], []
        for i in indices:
            texts += [examples[i].formal, examples[i].informal]
            labels += ["formal", "informal"]
        return texts, labels

    train = labelled([i for i in range(len(examples)) if i not in held_out])
    validation = labelled(sorted(held_out)) if held_out else None
    return train_classifier(
        *train, output_dir, label_names=("informal", "formal"), validation=validation, seed=seed, **kwargs
    )
