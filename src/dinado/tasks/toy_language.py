"""The demo's own small English-like language: a seeded grammar with a few hundred words.

Each sentence comes with its concepts (the lemmas of its content words), so a base model can be trained
CommonGen-style on ``"dog ball throw =" -> "the happy dog threw a red ball ."`` and a guide asked to cover
held-out concept sets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ADJECTIVES = (
    "big small red blue green old young happy sad quiet loud tall short bright dark warm cold soft hard fast "
    "slow brave shy clever kind angry tired busy lazy proud calm wild gentle noisy tiny huge golden silver "
    "wooden empty heavy light strange famous lucky careful hungry sleepy friendly funny serious curious "
    "little lonely rich poor clean dirty fresh sweet bitter"
).split()
# noun: (singular, plural)
NOUNS = [
    (n, n + "s")
    for n in (
        "dog cat bird horse cow lion tiger rabbit duck frog snake bear monkey girl boy farmer doctor teacher "
        "student baker singer painter driver pilot king queen friend neighbor ball book car boat train plane "
        "house tree flower river mountain garden park street window door table chair cup bottle apple "
        "cake bread lamp clock phone letter song game hat coat shoe bag key map ring road bridge hill field "
        "kite drum guitar piano camera basket blanket pillow candle rock star cloud island forest castle "
        "tower village market school kitchen"
    ).split()
] + [
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
    ("mouse", "mice"),
    ("fox", "foxes"),
    ("bus", "buses"),
    ("box", "boxes"),
    ("dish", "dishes"),
    ("city", "cities"),
    ("baby", "babies"),
    ("lady", "ladies"),
    ("sheep", "sheep"),
    ("fish", "fish"),
    ("knife", "knives"),
    ("leaf", "leaves"),
    ("wolf", "wolves"),
    ("goose", "geese"),
    ("tooth", "teeth"),
    ("foot", "feet"),
    ("person", "people"),
]
ANIMATE = set(
    "dog cat bird horse cow lion tiger rabbit duck frog snake bear monkey girl boy farmer doctor teacher "
    "student baker singer painter driver pilot king queen friend neighbor child man woman mouse fox baby "
    "lady sheep fish wolf goose person".split()
)
# transitive verbs: (lemma, third person, past, -ing)
TRANSITIVE = [
    ("see", "sees", "saw", "seeing"),
    ("take", "takes", "took", "taking"),
    ("find", "finds", "found", "finding"),
    ("throw", "throws", "threw", "throwing"),
    ("catch", "catches", "caught", "catching"),
    ("eat", "eats", "ate", "eating"),
    ("buy", "buys", "bought", "buying"),
    ("hold", "holds", "held", "holding"),
    ("carry", "carries", "carried", "carrying"),
    ("paint", "paints", "painted", "painting"),
    ("watch", "watches", "watched", "watching"),
    ("chase", "chases", "chased", "chasing"),
    ("push", "pushes", "pushed", "pushing"),
    ("pull", "pulls", "pulled", "pulling"),
    ("open", "opens", "opened", "opening"),
    ("close", "closes", "closed", "closing"),
    ("build", "builds", "built", "building"),
    ("break", "breaks", "broke", "breaking"),
    ("bring", "brings", "brought", "bringing"),
    ("draw", "draws", "drew", "drawing"),
    ("wash", "washes", "washed", "washing"),
    ("clean", "cleans", "cleaned", "cleaning"),
    ("fix", "fixes", "fixed", "fixing"),
    ("sell", "sells", "sold", "selling"),
    ("hide", "hides", "hid", "hiding"),
    ("kick", "kicks", "kicked", "kicking"),
    ("drop", "drops", "dropped", "dropping"),
    ("lift", "lifts", "lifted", "lifting"),
    ("follow", "follows", "followed", "following"),
    ("visit", "visits", "visited", "visiting"),
    ("love", "loves", "loved", "loving"),
    ("hug", "hugs", "hugged", "hugging"),
    ("feed", "feeds", "fed", "feeding"),
    ("ride", "rides", "rode", "riding"),
    ("drive", "drives", "drove", "driving"),
    ("read", "reads", "read", "reading"),
    ("write", "writes", "wrote", "writing"),
    ("cut", "cuts", "cut", "cutting"),
    ("play", "plays", "played", "playing"),
    ("climb", "climbs", "climbed", "climbing"),
    ("cross", "crosses", "crossed", "crossing"),
]
INTRANSITIVE = [
    ("run", "runs", "ran", "running"),
    ("sleep", "sleeps", "slept", "sleeping"),
    ("sing", "sings", "sang", "singing"),
    ("dance", "dances", "danced", "dancing"),
    ("swim", "swims", "swam", "swimming"),
    ("jump", "jumps", "jumped", "jumping"),
    ("laugh", "laughs", "laughed", "laughing"),
    ("cry", "cries", "cried", "crying"),
    ("sit", "sits", "sat", "sitting"),
    ("stand", "stands", "stood", "standing"),
    ("walk", "walks", "walked", "walking"),
    ("fly", "flies", "flew", "flying"),
    ("wait", "waits", "waited", "waiting"),
    ("smile", "smiles", "smiled", "smiling"),
    ("fall", "falls", "fell", "falling"),
    ("rest", "rests", "rested", "resting"),
    ("shout", "shouts", "shouted", "shouting"),
    ("ski", "skis", "skied", "skiing"),
    ("work", "works", "worked", "working"),
    ("play", "plays", "played", "playing"),
]
ADVERBS = (
    "quickly slowly happily quietly loudly carefully suddenly often never always gently proudly calmly "
    "bravely sadly eagerly softly together again today"
).split()
PLACES = (
    "in the park|near the river|on the hill|at the market|in the garden|by the window|under the tree|"
    "across the bridge|in the kitchen|at school|on the road|in the forest|near the castle|in the village"
).split("|")
DETERMINERS = "the a my his her our their this that every some one".split()
PLURAL_DETERMINERS = "the my his her our their these those some two three many".split()


@dataclass
class Example:
    sentence: str
    concepts: list[str]  # lemmas of content words, in sentence order

    @property
    def prompt(self) -> str:
        return " ".join(self.concepts) + " ="


class ToyLanguage:
    """Seeded sentences from a dozen templates; every call of :meth:`sentence` draws a fresh one."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def _noun_phrase(self, animate: bool | None = None) -> tuple[str, str, bool]:
        pool = [n for n in NOUNS if animate is None or (n[0] in ANIMATE) == animate]
        singular, plural = self.rng.choice(pool)
        is_plural = self.rng.random() < 0.3
        det = self.rng.choice(PLURAL_DETERMINERS if is_plural else DETERMINERS)
        if det == "a" and singular[0] in "aeiou":
            det = "an"
        words = [det]
        if self.rng.random() < 0.5:
            adjective = self.rng.choice(ADJECTIVES)
            if det == "an" and adjective[0] not in "aeiou":
                words[0] = "a"
            elif det == "a" and adjective[0] in "aeiou":
                words[0] = "an"
            words.append(adjective)
        words.append(plural if is_plural else singular)
        return " ".join(words), singular, is_plural

    def _verb(self, verb: tuple[str, str, str, str], plural_subject: bool) -> str:
        lemma, third, past, ing = verb
        tense = self.rng.choice(["past", "past", "present", "progressive"])
        if tense == "past":
            return past
        if tense == "present":
            return lemma if plural_subject else third
        return ("are " if plural_subject else "is ") + ing

    def example(self) -> Example:
        subject, s_lemma, s_plural = self._noun_phrase(animate=True)
        concepts = [s_lemma]
        template = self.rng.randrange(6)
        if template < 3:
            verb = self.rng.choice(TRANSITIVE)
            obj, o_lemma, _ = self._noun_phrase()
            parts = [subject, self._verb(verb, s_plural), obj]
            concepts += [verb[0], o_lemma]
        else:
            verb = self.rng.choice(INTRANSITIVE)
            parts = [subject, self._verb(verb, s_plural)]
            concepts.append(verb[0])
        if self.rng.random() < 0.3:
            parts.append(self.rng.choice(ADVERBS))
        if template in (1, 4) or self.rng.random() < 0.2:
            place = self.rng.choice(PLACES)
            parts.append(place)
            concepts.append(place.split()[-1])
        if template == 5:
            parts = ["while " + " ".join(parts) + ",", *self._clause(concepts)]
        sentence = " ".join(parts) + " ."
        return Example(sentence[0].upper() + sentence[1:], concepts)

    def _clause(self, concepts: list[str]) -> list[str]:
        subject, lemma, plural = self._noun_phrase(animate=True)
        verb = self.rng.choice(INTRANSITIVE)
        concepts += [lemma, verb[0]]
        return [subject, self._verb(verb, plural)]

    def examples(self, n: int) -> list[Example]:
        return [self.example() for _ in range(n)]


def vocabulary_size() -> int:
    """How many distinct words the grammar can produce (for docs and tests)."""
    words = (
        set(ADJECTIVES)
        | set(ADVERBS)
        | set(DETERMINERS)
        | set(PLURAL_DETERMINERS)
        | {"an", "is", "are", "while"}
    )
    words |= {w for n in NOUNS for w in n}
    words |= {w for v in TRANSITIVE + INTRANSITIVE for w in v}
    words |= {w for p in PLACES for w in p.split()}
    return len(words)
