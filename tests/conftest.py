import warnings
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from dinado import exact

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

# The test models are tiny: one thread avoids thread start-up and oversubscription costs that, measured on
# 2 cores, made training steps 2x-25x slower than a single thread.
torch.set_num_threads(1)


def tiny_gpt2(seed: int = 0, vocab_size: int = 40, width: int = 32, layers: int = 2) -> GPT2LMHeadModel:
    """A small random GPT-2 (from a config, no download), EOS = pad = 0."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=64,
        n_embd=width,
        n_layer=layers,
        n_head=2,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = GPT2LMHeadModel(config).eval()
    model.generation_config.pad_token_id = 0
    return model


def randomize_guide(guide, seed: int = 1, scale: float = 0.3) -> None:
    """Move every trainable parameter (zero-initialised heads included) away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture
def toy_base():
    return exact.toy_base(3, init_scale=0.3)


# ../shared beside the checkout (as in CI); tests that need it skip when it is absent.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 BPE from ../shared/data (transformers 5.x: pass the files as vocab= and merges=)."""
    from transformers import GPT2Tokenizer

    files = SHARED_DATA / "gpt2-tokenizer"
    if not files.is_dir():
        pytest.skip(f"{files} is not present")
    tokenizer = GPT2Tokenizer(vocab=str(files / "encoder.json"), merges=str(files / "vocab.bpe"))
    assert len(tokenizer) == 50257  # a wrong keyword silently gives a one-token vocabulary
    return tokenizer
