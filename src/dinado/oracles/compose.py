"""Composition: :class:`AllOf`, :class:`AnyOf`, :class:`Not`, :class:`WeightedProduct` and :class:`Floor` of
other oracles.

Each part is called through :func:`~dinado.oracles.base.call_oracle` (its values checked), and only on the
samples whose result it can still change, so cheap parts should come first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .base import OracleBase, call_oracle, config_of, describe, level_of
from .registry import build_from_config, check_keys, register_oracle


def _common_level(oracles: Sequence[Callable], who: str) -> str | None:
    levels = {lvl for lvl in map(level_of, oracles) if lvl is not None}
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


def _product(
    terms: Iterable[tuple[Callable, Callable[[float], float]]], prompts: Sequence, completions: Sequence
) -> list[float]:
    """``prod_i f_i(oracle_i)`` per sample over ``[(oracle_i, f_i), ...]``; each oracle is called (checked) only
    on the samples whose product is still above 0."""
    values = [1.0] * len(completions)
    for oracle, f in terms:
        alive = [i for i, v in enumerate(values) if v > 0]
        if not alive:
            break
        scores = call_oracle(oracle, [prompts[i] for i in alive], [completions[i] for i in alive])
        for i, v in zip(alive, scores, strict=True):
            values[i] *= f(v)
    return values


class AllOf(OracleBase):
    """The product of the oracles' values: logical AND for 0/1 values, P(all) for independent soft values.

    Oracles are evaluated in order, each only on the samples still above 0, so put cheap ones first.
    """

    text_inputs = ()  # the parts check their own inputs

    def __init__(self, *oracles: Callable) -> None:
        self.oracles = _check_oracles(oracles, "AllOf")
        self.level = _common_level(self.oracles, "AllOf")

    def _score(self, prompts: list, completions: list) -> list[float]:
        return _product(((o, lambda v: v) for o in self.oracles), prompts, completions)

    def __repr__(self) -> str:
        return f"AllOf({', '.join(map(describe, self.oracles))})"

    def to_config(self) -> dict[str, Any]:
        return {"type": "all_of", "oracles": [config_of(o) for o in self.oracles]}


class AnyOf(OracleBase):
    """``1 - prod(1 - v_i)``: logical OR for 0/1 values, P(any) for independent soft values."""

    text_inputs = ()

    def __init__(self, *oracles: Callable) -> None:
        self.oracles = _check_oracles(oracles, "AnyOf")
        self.level = _common_level(self.oracles, "AnyOf")

    def _score(self, prompts: list, completions: list) -> list[float]:
        misses = _product(((o, lambda v: 1.0 - v) for o in self.oracles), prompts, completions)
        return [1.0 - m for m in misses]

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(describe, self.oracles))})"

    def to_config(self) -> dict[str, Any]:
        return {"type": "any_of", "oracles": [config_of(o) for o in self.oracles]}


class Not(OracleBase):
    """``1 - v``: e.g. "does not mention these words"."""

    text_inputs = ()

    def __init__(self, oracle: Callable) -> None:
        self.oracle = _check_oracles([oracle], "Not")[0]
        self.level = level_of(oracle)

    def _score(self, prompts: list, completions: list) -> list[float]:
        return [1.0 - v for v in call_oracle(self.oracle, prompts, completions)]

    def __repr__(self) -> str:
        return f"Not({describe(self.oracle)})"

    def to_config(self) -> dict[str, Any]:
        return {"type": "not", "oracle": config_of(self.oracle)}


class WeightedProduct(OracleBase):
    """``prod v_i ** w_i`` over ``[(oracle, weight), ...]``, weights finite and >= 0 (``0 ** 0 = 1``).

    A weight-0 term contributes 1 and is not evaluated. Samples already at 0 are not passed to later terms.
    """

    text_inputs = ()

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

    def _score(self, prompts: list, completions: list) -> list[float]:
        terms = ((o, lambda v, w=w: v**w) for o, w in self.terms if w != 0)
        return _product(terms, prompts, completions)

    def __repr__(self) -> str:
        terms = ", ".join(f"({describe(o)}, {w:g})" for o, w in self.terms)
        return f"WeightedProduct([{terms}])"

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "weighted_product",
            "oracles": [{"oracle": config_of(o), "weight": w} for o, w in self.terms],
        }


class Floor(OracleBase):
    """``floor + (1 - floor) * v``, ``0 <= floor < 1``: a soft penalty. Inside :class:`AllOf` a failed 0/1 check
    wrapped in ``Floor(check, 0.3)`` multiplies the other values by 0.3 instead of zeroing them."""

    text_inputs = ()

    def __init__(self, oracle: Callable, floor: float) -> None:
        self.oracle = _check_oracles([oracle], "Floor")[0]
        if isinstance(floor, bool) or not isinstance(floor, (int, float)):
            raise TypeError(f"Floor: floor must be a number in [0, 1), got {floor!r}")
        if not 0.0 <= floor < 1.0:
            raise ValueError(
                f"Floor: floor must be in [0, 1), got {floor!r} (1 would make every value 1: drop the oracle instead)"
            )
        self.floor = float(floor)
        self.level = level_of(oracle)

    def _score(self, prompts: list, completions: list) -> list[float]:
        return [self.floor + (1.0 - self.floor) * v for v in call_oracle(self.oracle, prompts, completions)]

    def __repr__(self) -> str:
        return f"Floor({describe(self.oracle)}, {self.floor:g})"

    def to_config(self) -> dict[str, Any]:
        return {"type": "floor", "oracle": config_of(self.oracle), "floor": self.floor}


# ----------------------------------------------------------------------------------------------------------
# configs


def _children(c: Mapping, key: str, where: str) -> list:
    children = c[key]
    if isinstance(children, (str, Mapping)) or not isinstance(children, Sequence):
        raise ValueError(f"{where}: {key!r} must be a list, got {children!r}")
    return list(children)


def _build_all_of(c: Mapping, where: str) -> AllOf:
    return AllOf(*_build_children(c, where))


def _build_any_of(c: Mapping, where: str) -> AnyOf:
    return AnyOf(*_build_children(c, where))


def _build_children(c: Mapping, where: str) -> list[OracleBase]:
    check_keys(c, {"oracles"}, set(), where)
    children = _children(c, "oracles", where)
    return [build_from_config(o, f"{where}.oracles[{i}]") for i, o in enumerate(children)]


def _build_not(c: Mapping, where: str) -> Not:
    check_keys(c, {"oracle"}, set(), where)
    return Not(build_from_config(c["oracle"], f"{where}.oracle"))


def _build_weighted_product(c: Mapping, where: str) -> WeightedProduct:
    check_keys(c, {"oracles"}, set(), where)
    terms = []
    for i, term in enumerate(_children(c, "oracles", where)):
        here = f"{where}.oracles[{i}]"
        if not isinstance(term, Mapping):
            raise ValueError(f"{here}: expected {{'oracle': {{...}}, 'weight': w}}, got {term!r}")
        check_keys(term, {"oracle", "weight"}, set(), here)
        terms.append((build_from_config(term["oracle"], f"{here}.oracle"), term["weight"]))
    return WeightedProduct(terms)


def _build_floor(c: Mapping, where: str) -> Floor:
    check_keys(c, {"oracle", "floor"}, set(), where)
    return Floor(build_from_config(c["oracle"], f"{where}.oracle"), c["floor"])


register_oracle("all_of", _build_all_of)
register_oracle("any_of", _build_any_of)
register_oracle("not", _build_not)
register_oracle("weighted_product", _build_weighted_product)
register_oracle("floor", _build_floor)
