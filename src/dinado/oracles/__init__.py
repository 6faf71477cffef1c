"""Oracles: callables that judge whole sequences, on token ids or on decoded text, in batches.

An oracle is ``oracle(prompts, completions) -> values in [0, 1]``, one value per sample. The sampler and the
exact evaluator call it on token ids; the oracles defined here (keywords, regex, classifier, user callables
and their compositions) judge decoded text, and :class:`TextOracle` (or :func:`as_token_oracle`) adapts them
to token ids. Every oracle here can be described by a plain dict (:func:`oracle_from_config` builds one,
``oracle.to_config()`` gives it back), so a YAML file can hold it; a task adds its own types with
:func:`register_oracle`. See docs/oracles.md.

Modules: ``base`` (the contract, :class:`OracleBase`'s template method, :func:`call_oracle`), ``registry``
(configs and import paths), ``keywords``, ``regex``, ``callables``, ``classifier``, ``compose``. Importing
this package registers the built-in config types, in the order below.
"""

from .base import (
    Oracle,
    OracleBase,
    OracleError,
    TextOracle,
    TokenOracle,
    as_token_oracle,
    call_oracle,
    describe,
)
from .registry import load_callable, oracle_from_config, register_oracle

# each module registers its config types when imported: this order is the order errors list them in
# isort: off
from .keywords import LEMMINFLECT_REQUIREMENT, KeywordList, KeywordOracle
from .regex import RegexOracle
from .callables import CallableOracle
from .classifier import ClassifierOracle
from .compose import AllOf, AnyOf, Floor, Not, WeightedProduct
# isort: on

__all__ = [
    "LEMMINFLECT_REQUIREMENT",
    "AllOf",
    "AnyOf",
    "CallableOracle",
    "ClassifierOracle",
    "Floor",
    "KeywordList",
    "KeywordOracle",
    "Not",
    "Oracle",
    "OracleBase",
    "OracleError",
    "RegexOracle",
    "TextOracle",
    "TokenOracle",
    "WeightedProduct",
    "as_token_oracle",
    "call_oracle",
    "describe",
    "load_callable",
    "oracle_from_config",
    "register_oracle",
]
