"""The models :func:`dinado.pretrain.pretrain` trains, built from a config (no download): a GPT-2 causal LM or a
Marian encoder-decoder, sized by the config and the tokenizer, whose one special token is BOS, EOS and pad."""

from __future__ import annotations

import torch

from .config import PretrainConfig


def _special_ids_in_generation_config(model, eos: int) -> None:
    """The one special token is BOS, EOS and pad for generate() too."""
    model.generation_config.update(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)


def _build_marian(config: PretrainConfig, tokenizer):
    from transformers import MarianConfig, MarianMTModel

    eos = tokenizer.eos_token_id
    marian_config = MarianConfig(
        vocab_size=len(tokenizer),
        d_model=config.n_embd,
        encoder_layers=config.n_layer,
        decoder_layers=config.n_layer,
        encoder_attention_heads=config.n_head,
        decoder_attention_heads=config.n_head,
        encoder_ffn_dim=4 * config.n_embd,
        decoder_ffn_dim=4 * config.n_embd,
        max_position_embeddings=config.context,
        dropout=config.dropout,
        attention_dropout=config.dropout,
        activation_dropout=0.0,
        scale_embedding=True,  # as in the OPUS-MT Marian models: token embeddings on the sinusoids' scale
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        decoder_start_token_id=eos,
        forced_eos_token_id=None,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
    )
    model = MarianMTModel(marian_config)
    # Marian's embeddings treat pad_token_id as a padding index: a row initialised to zero that gets no
    # gradient from its uses as an input (only through the tied output layer). Here that id is also EOS and
    # the decoder start token (the tokenizer's one special token), which ends every source and starts every
    # decoder input, so it gets an ordinary trainable row. padding_idx only affects initialisation and
    # gradients, so the saved weights compute the same after from_pretrained.
    embeddings = model.model.shared  # tied: the same weight as the encoder's, decoder's and output layer's
    for module in (embeddings, model.get_encoder().embed_tokens, model.get_decoder().embed_tokens):
        module.padding_idx = None
    with torch.no_grad():
        embeddings.weight[eos].normal_(0.0, marian_config.init_std)
    _special_ids_in_generation_config(model, eos)
    model.generation_config.decoder_start_token_id = eos
    return model


def _build_model(config: PretrainConfig, tokenizer):
    """The model ``config.architecture`` names, randomly initialised (seed torch first)."""
    if config.architecture == "marian":
        return _build_marian(config, tokenizer)
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    gpt2_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.context,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(gpt2_config)
    _special_ids_in_generation_config(model, eos)
    return model
