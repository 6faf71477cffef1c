"""dinado: controlled generation with NADO and DiNADO (Hard, Soft, Merge) guides over Hugging Face models."""

from . import exact
from .config import VARIANTS, GuideConfig
from .decoding import GuideLogitsProcessor, generate
from .guide import Guide
from .oracles import TextOracle
from .samples import SampleSet
from .sampling import sample
from .training import TrainReport, train

__all__ = [
    "VARIANTS",
    "Guide",
    "GuideConfig",
    "GuideLogitsProcessor",
    "SampleSet",
    "TextOracle",
    "TrainReport",
    "exact",
    "generate",
    "sample",
    "train",
]
__version__ = "0.1.0"
