import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from dinado import exact

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


def tiny_llama(seed: int = 0, vocab_size: int = 40, width: int = 32, layers: int = 2) -> LlamaForCausalLM:
    """A small random Llama (SmolLM2's architecture: rotary positions, grouped-query attention, tied
    embeddings), from a config, no download; EOS = pad = BOS = 0 as in ``tiny_gpt2``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=0.3,
        attention_dropout=0.1,  # as GPT-2's: eval mode matters
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 0
    return model


CAUSAL_KINDS = ("gpt2", "llama")


def tiny_causal(kind: str, **kwargs):
    """``tiny_gpt2`` or ``tiny_llama`` by name (for tests parametrised over the decoder-only architectures)."""
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[kind](**kwargs)


def with_dropout(model, p: float = 0.5):
    """Give every dropout of ``model`` probability ``p`` and leave it in training mode (as a freshly built one is).

    Many attention layers keep their dropout as a float attribute (Llama's ``attention_dropout``, T5's and
    BART's ``dropout``), not a module: those are set too.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, p)
    return model.train()


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


SEQ2SEQ_KINDS = ("t5", "bart", "marian")


def tiny_seq2seq(kind: str, seed: int = 0, vocab_size: int = 24, width: int = 32):
    """A small random encoder-decoder (from a config, no download): EOS = 1, pad = decoder start = 0."""
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        MarianConfig,
        MarianMTModel,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(seed)
    ids = dict(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    if kind == "t5":
        config = T5Config(
            vocab_size=vocab_size, d_model=width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            initializer_factor=3.0, dropout_rate=0.1, **ids,
        )  # fmt: skip
        model = T5ForConditionalGeneration(config)
    elif kind in ("bart", "marian"):
        cls_config, cls_model = (
            (BartConfig, BartForConditionalGeneration) if kind == "bart" else (MarianConfig, MarianMTModel)
        )
        config = cls_config(
            vocab_size=vocab_size, d_model=width, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
            max_position_embeddings=64, init_std=0.3, dropout=0.1, bos_token_id=0, forced_eos_token_id=None,
            **ids,
        )  # fmt: skip
        model = cls_model(config)
    else:
        raise ValueError(kind)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.generation_config.decoder_start_token_id = 0
    model.generation_config.forced_eos_token_id = None
    model.generation_config.forced_bos_token_id = None
    return model.eval()


def tiny_marian_with_tokenizer(
    texts: list[str], vocab_size: int = 300, max_positions: int = 64, seed: int = 0
):
    """A tiny Marian over a byte-level BPE trained on ``texts`` (EOS = pad = decoder start = 0)."""
    from transformers import MarianConfig, MarianMTModel

    from dinado.pretrain import build_tokenizer

    tokenizer = build_tokenizer(texts, vocab_size=vocab_size, min_frequency=1)
    torch.manual_seed(seed)
    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=max_positions,
        pad_token_id=0, eos_token_id=0, decoder_start_token_id=0, forced_eos_token_id=None, init_std=0.3,
    )  # fmt: skip
    model = MarianMTModel(config).eval()
    model.generation_config.update(pad_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    return model, tokenizer


def load_benchmark(*parts: str):
    """Import a benchmark script (benchmarks/<parts>) as a module, for its main()."""
    import importlib.util

    path = Path(__file__).resolve().parents[1].joinpath("benchmarks", *parts)
    spec = importlib.util.spec_from_file_location(path.stem + "_" + path.parent.name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
