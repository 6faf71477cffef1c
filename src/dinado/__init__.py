"""dinado: controlled generation with NADO and DiNADO (Hard, Soft, Merge) guides over Hugging Face models."""

from . import exact, features
from ._version import __version__ as __version__
from .config import VARIANTS, GuideConfig
from .data import SampleSet
from .decoding import GuideLogitsProcessor, generate
from .features import FeatureCache, precompute_features, precompute_shared_features
from .guide import Guide
from .hf import load_model
from .objectives import sequence_log_values
from .oracles import TextOracle
from .sampling import relabel, sample, sample_with_features
from .text import reference_samples, rerank_by_value
from .training import TrainReport, train

__all__ = [
    "VARIANTS",
    "FeatureCache",
    "Guide",
    "GuideConfig",
    "GuideLogitsProcessor",
    "SampleSet",
    "TextOracle",
    "TrainReport",
    "exact",
    "features",
    "generate",
    "load_model",
    "precompute_features",
    "precompute_shared_features",
    "reference_samples",
    "rerank_by_value",
    "relabel",
    "sample",
    "sample_with_features",
    "sequence_log_values",
    "train",
]
