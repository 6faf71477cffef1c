"""Train a small base model from scratch: a byte-level BPE tokenizer and a GPT-2 causal LM or a Marian
encoder-decoder.

For users without a pretrained model (and for the demo, a CommonGen base model and small translation bases).
The data is a plain text file (one document or sentence per line) or parallel prompt/target line files
(CommonGen's ``train_src.txt``/``train_trg.txt``, or source/translation files). :func:`pretrain` writes a
directory that loads with ``AutoTokenizer.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``
(``architecture="gpt2"``) or ``AutoModelForSeq2SeqLM.from_pretrained`` (``architecture="marian"``); see
``docs/pretrain.md``.

- :mod:`.config`: ``PretrainConfig``, each field with its help line and its check (field metadata);
- :mod:`.data`: reading text and pairs, the held-out split, the tokenizer, the padded rows;
- :mod:`.model`: the GPT-2 and Marian models built from a config;
- :mod:`.loop`: :func:`pretrain` (steps, evaluations, early stopping, saving) and ``PretrainResult``.
"""

from .config import ARCHITECTURES as ARCHITECTURES
from .config import DATA_FORMATS as DATA_FORMATS
from .config import EOS_TOKEN, PretrainConfig
from .config import LR_SCHEDULES as LR_SCHEDULES
from .data import build_tokenizer, read_pairs, read_text_lines
from .loop import CONFIG_FILE as CONFIG_FILE
from .loop import METRICS_FILE as METRICS_FILE
from .loop import PretrainResult, pretrain

__all__ = [  # as before the package; the constants are importable by name too
    "EOS_TOKEN",
    "PretrainConfig",
    "PretrainResult",
    "build_tokenizer",
    "pretrain",
    "read_pairs",
    "read_text_lines",
]
