"""dinado: controlled generation with NADO and DiNADO (Hard, Soft, Merge) guides over Hugging Face models."""

from . import exact, features
from .config import VARIANTS, GuideConfig
from .decoding import GuideLogitsProcessor, generate
from .features import FeatureCache, precompute_features
from .guide import Guide
from .oracles import TextOracle
from .samples import SampleSet
from .sampling import sample
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
    "precompute_features",
    "sample",
    "train",
]
__version__ = "0.1.0"
