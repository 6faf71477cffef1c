"""Encoder-decoder bases (T5, BART, Marian): the guide reads the decoder, everything else as for causal LMs."""

import pytest
import torch

import dinado
from dinado import VARIANTS, Guide, SampleSet
from dinado.hf import base_body, unwrap_peft
from dinado.objectives import guide_loss

from .conftest import SEQ2SEQ_KINDS, randomize_guide, tiny_gpt2, tiny_marian_with_tokenizer, tiny_seq2seq
from .test_decoding import Recorder

SOURCES = torch.tensor([[5, 6, 7, 8, 1], [9, 4, 1, 0, 0]])  # right-padded sources ending in EOS (1)
SOURCE_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0),
    "beam3": dict(num_beams=3, do_sample=False),
}


def _guide(kind, variant, seed=0):
    guide = Guide.create(tiny_seq2seq(kind, seed=seed), variant)
    randomize_guide(guide)
    return guide.eval()


def _reference(guide, decoder_ids):
    """next_token_logprobs of the full decoder rows, each row's source repeated per beam."""
    rows = decoder_ids.shape[0]
    k = rows // SOURCES.shape[0]
    with torch.no_grad():
        return guide.next_token_logprobs(
            decoder_ids,
            torch.ones_like(decoder_ids),
            encoder_input_ids=SOURCES.repeat_interleave(k, 0),
            encoder_attention_mask=SOURCE_MASK.repeat_interleave(k, 0),
        )


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_processor_equals_next_token_logprobs_at_every_step(kind, variant, mode):
    guide = _guide(kind, variant)
    recorder = Recorder()
    torch.manual_seed(0)
    out = dinado.generate(
        guide, SOURCES, SOURCE_MASK, logits_processor=[recorder], max_new_tokens=5, **MODES[mode]
    )
    assert out[:, 0].eq(0).all()  # output starts with the decoder start token
    assert len(recorder.steps) >= 2
    worst = max((_reference(guide, ids)[:, -1] - scores).abs().max().item() for ids, scores in recorder.steps)
    assert worst < 2e-4


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_guide_reads_the_decoder_and_guidance_matters(kind):
    guide = _guide(kind, "nado")
    assert base_body(guide.base) is unwrap_peft(guide.base).get_decoder()
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_scores=True)
    base_out = guide.base.generate(SOURCES, attention_mask=SOURCE_MASK, **kwargs)
    alpha0 = dinado.generate(guide, SOURCES, SOURCE_MASK, alpha=0.0, **kwargs)
    guided = dinado.generate(guide, SOURCES, SOURCE_MASK, **kwargs)
    assert torch.equal(base_out.sequences, alpha0.sequences)
    first = lambda out: torch.log_softmax(out.scores[0], -1)
    assert (first(base_out) - first(alpha0)).abs().max() < 1e-4
    assert (first(base_out) - first(guided)).abs().max() > 1e-2


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_the_source_conditions_the_guide(kind):
    """Same decoder tokens, different sources: the guide's direction must differ (it sees the encoder)."""
    guide = _guide(kind, "dinado-soft")
    dec = torch.tensor([[0, 3, 4], [0, 3, 4]])
    other = torch.tensor([[11, 12, 13, 14, 1], [2, 3, 1, 0, 0]])
    with torch.no_grad():
        a = guide(dec, None, SOURCES, SOURCE_MASK).direction
        b = guide(dec, None, other, SOURCE_MASK).direction
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_merge_equals_the_adapted_model_and_decodes_q_theta(kind):
    guide = _guide(kind, "dinado-merge")
    base_type = type(unwrap_peft(guide.base))
    merged = guide.merge()
    assert type(merged) is base_type
    assert sum(p.numel() for p in merged.parameters()) == sum(
        p.numel() for p in tiny_seq2seq(kind).parameters()
    )
    dec = torch.tensor([[0, 3, 4, 5], [0, 6, 7, 8]])
    with torch.no_grad():
        adapted = guide.base(input_ids=SOURCES, attention_mask=SOURCE_MASK, decoder_input_ids=dec).logits
        plain = merged(input_ids=SOURCES, attention_mask=SOURCE_MASK, decoder_input_ids=dec).logits
        with guide.base.disable_adapter():
            frozen = guide.base(input_ids=SOURCES, attention_mask=SOURCE_MASK, decoder_input_ids=dec).logits
    assert (adapted - plain).abs().max() < 1e-4
    assert (adapted - frozen).abs().max() > 1e-2
    kwargs = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(
        merged.generate(SOURCES, attention_mask=SOURCE_MASK, **kwargs),
        dinado.generate(guide, SOURCES, SOURCE_MASK, **kwargs),
    )


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_lora_sits_in_the_architectures_own_linear_layers(kind):
    guide = Guide.create(tiny_seq2seq(kind), "dinado-merge")
    names = [n for n, _ in guide.base.named_parameters() if "lora_A" in n]
    assert any(".decoder." in n for n in names)
    assert not any("lm_head" in n for n in names)
    own = {"t5": (".q.", ".v."), "bart": ("q_proj", "v_proj"), "marian": ("q_proj", "v_proj")}[kind]
    targeted = Guide.create(
        tiny_seq2seq(kind), "dinado-merge", lora_target_modules=[s.strip(".") for s in own]
    )
    picked = [n for n, _ in targeted.base.named_parameters() if "lora_A" in n]
    assert picked and all(any(s in n for s in own) for n in picked)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_save_and_load_round_trip(kind, variant, tmp_path):
    guide = _guide(kind, variant)
    guide.save_pretrained(tmp_path / "g")
    loaded = Guide.from_pretrained(tmp_path / "g", tiny_seq2seq(kind)).eval()
    dec = torch.tensor([[0, 3, 4, 5], [0, 6, 7, 8]])
    with torch.no_grad():
        a = guide.next_token_logprobs(
            dec, None, encoder_input_ids=SOURCES, encoder_attention_mask=SOURCE_MASK
        )
        b = loaded.next_token_logprobs(
            dec, None, encoder_input_ids=SOURCES, encoder_attention_mask=SOURCE_MASK
        )
    assert (a - b).abs().max() < 1e-5


def _first_token_oracle(token):
    return lambda prompts, completions: [float(c[0] == token) for c in completions]


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_sample_records_decoder_tokens_and_exact_base_log_probs(kind):
    model = tiny_seq2seq(kind)
    prompts = [[5, 6, 7, 1], [9, 1]]
    samples = dinado.sample(model, prompts, 3, _first_token_oracle(4), max_new_tokens=4, seed=0, batch_size=2)
    assert samples.decoder_start_token_id == 0
    assert samples.log_weights is None
    assert samples.prompts[0] == prompts[0] and samples.prompts[3] == prompts[1]
    for i in range(len(samples)):
        comp = samples.completions[i]
        assert len(comp) <= 4 and (1 not in comp[:-1])  # stops at EOS
        dec = torch.tensor([[0] + comp])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([samples.prompts[i]]), decoder_input_ids=dec).logits
        lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, dec[0, 1:, None]).squeeze(-1)
        assert torch.allclose(lp, torch.tensor(samples.token_log_p[i]), atol=1e-4)


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_samples_from_a_merge_guide_and_a_proposal_carry_exact_weights(kind):
    model = tiny_seq2seq(kind)
    prompts = [[5, 6, 7, 1], [9, 1]]
    reference = dinado.sample(model, prompts, 2, _first_token_oracle(4), max_new_tokens=4, seed=0)
    guide = _guide(kind, "dinado-merge")
    for source, extra in ((guide, {}), (model, {"proposal": tiny_seq2seq(kind, seed=3)})):
        samples = dinado.sample(
            source, prompts, 2, _first_token_oracle(4), max_new_tokens=4, seed=0, batch_size=3, **extra
        )
        assert samples.log_weights is not None and samples.log_weights.abs().max() > 1e-3
        for i in range(len(samples)):
            dec = torch.tensor([[0] + samples.completions[i]])
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([samples.prompts[i]]), decoder_input_ids=dec).logits
            lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, dec[0, 1:, None]).squeeze(-1)
            assert abs(float(lp.sum()) - sum(samples.token_log_p[i])) < 1e-4
    assert reference.decoder_start_token_id == 0


def test_collate_puts_the_source_in_the_encoder_fields():
    samples = SampleSet.from_token_ids(
        [[5, 6, 1], [7, 1]], [[3, 4, 1], [2]], [1.0, 0.0], metadata={"decoder_start_token_id": 0}
    )
    batch = samples.collate([0, 1], pad_id=0)
    assert batch.input_ids.tolist() == [[0, 3, 4, 1], [0, 2, 0, 0]]
    assert batch.completion_mask.tolist() == [[0, 1, 1, 1], [0, 1, 0, 0]]
    assert batch.terminal_mask.tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]
    assert batch.encoder_input_ids.tolist() == [[5, 6, 1], [7, 1, 0]]
    assert batch.encoder_attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_on_seq2seq_samples_raises_the_satisfaction_rate(variant):
    """Oracle: the first target token is 4. After training, the guide's q puts far more mass on it than p."""
    model = tiny_seq2seq("marian")
    prompts = [[5 + i % 7, 6 + i % 5, 1] for i in range(8)]
    samples = dinado.sample(model, prompts, 16, _first_token_oracle(4), max_new_tokens=3, seed=0)
    assert 0 < samples.positive_rate < 0.5
    src, mask = SOURCES, SOURCE_MASK
    dec = torch.zeros((2, 1), dtype=torch.long)
    with torch.no_grad():  # before the guide exists: LoRA wraps the base model's layers in place
        p = torch.log_softmax(model(input_ids=src, attention_mask=mask, decoder_input_ids=dec).logits, -1)
    guide = Guide.create(model, variant)
    batch = samples.collate(range(len(samples)))
    before = guide_loss(guide, batch).cross_entropy.item()
    dinado.train(guide, samples, max_steps=60, batch_size=32, learning_rate=1e-2, seed=0)
    assert guide_loss(guide, batch).cross_entropy.item() < before
    with torch.no_grad():
        q = guide.next_token_logprobs(dec, None, encoder_input_ids=src, encoder_attention_mask=mask)[:, 0, 4]
    assert (q.exp() > p[:, 0, 4].exp() + 0.1).all()


def test_mixing_decoder_only_samples_and_a_seq2seq_guide_is_refused():
    causal = dinado.sample(tiny_gpt2(vocab_size=24), [[5, 6]], 2, _first_token_oracle(4), max_new_tokens=2)
    with pytest.raises(ValueError, match="decoder-only base .* encoder-decoder model"):
        dinado.train(Guide.create(tiny_seq2seq("t5"), "nado"), causal, max_steps=1)


def test_forward_names_the_missing_or_misplaced_source():
    guide = _guide("bart", "nado")
    with pytest.raises(ValueError, match="pass the source as encoder_input_ids"):
        guide(torch.tensor([[0, 3]]))
    causal = Guide.create(tiny_gpt2(vocab_size=24), "nado")
    with pytest.raises(ValueError, match="decoder-only model"):
        causal(torch.tensor([[0, 3]]), None, SOURCES)


# ------------------------------------------------------------------ text helpers and baselines


@pytest.fixture(scope="module")
def seq2seq_with_tokenizer():
    texts = ["the cat sat on the mat", "der Hund schläft", "el gato duerme", "you are kind", "Sie sind nett"]
    return tiny_marian_with_tokenizer(texts * 4)


def test_encode_prompts_ends_every_source_with_eos(seq2seq_with_tokenizer):
    from dinado.text import encode_prompts

    _, tokenizer = seq2seq_with_tokenizer
    rows = encode_prompts(tokenizer, ["the cat", ""], encoder_decoder=True)
    assert rows[0][-1] == tokenizer.eos_token_id and rows[0][:-1] == tokenizer("the cat")["input_ids"]
    assert rows[1] == [tokenizer.eos_token_id]
    assert encode_prompts(tokenizer, ["the cat"])[0] == tokenizer("the cat")["input_ids"]


def test_generate_texts_on_a_seq2seq_guide_equals_token_level_generate(seq2seq_with_tokenizer):
    from dinado.data import pad_prompts
    from dinado.text import encode_prompts, generate_texts, new_tokens

    model, tokenizer = seq2seq_with_tokenizer
    guide = Guide.create(model, "dinado-soft")
    randomize_guide(guide)
    sources = ["the cat sat", "you are kind to me"]
    texts, count, _ = generate_texts(guide, tokenizer, sources, max_new_tokens=6, do_sample=False)
    ids, mask = pad_prompts(encode_prompts(tokenizer, sources, True), 0, True)
    assert mask[1].all() and not mask[0].all() and mask[0, 0] == 1  # right-padded
    out = dinado.generate(guide, ids, mask, max_new_tokens=6, do_sample=False)
    expected = [t.strip() for t in tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)]
    assert texts == expected and count == int((out[:, 1:] != 0).sum())
    assert torch.equal(new_tokens(out, ids.shape[1], True), out[:, 1:])  # the decoder start is not output
    assert torch.equal(new_tokens(out, 2, False), out[:, 2:])


def test_supervised_lora_finetune_of_a_seq2seq_base_learns_its_targets(seq2seq_with_tokenizer):
    from dinado.baselines import _seq2seq_rows, supervised_finetune

    model, tokenizer = seq2seq_with_tokenizer
    sources, targets = ["the cat sat", "you are kind"], ["der Hund schläft", "Sie sind nett"]
    tuned, info = supervised_finetune(
        model, tokenizer, sources, targets, max_steps=150, batch_size=2, learning_rate=1e-2, seed=0
    )
    assert type(tuned) is type(model) and info["train_loss_last"] < 0.5 * info["train_loss_first"]
    ids, mask, labels, _ = _seq2seq_rows(tokenizer, sources, targets, None)
    assert labels[0, -1] == tokenizer.eos_token_id and (mask.sum(1) == torch.tensor([4, 5])).all()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        after = tuned(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert after < 0.5 * before  # the merged model, not only the training loop, learned the targets
    with pytest.raises(ValueError, match="fine-tune an encoder-decoder base with method='lora'"):
        supervised_finetune(model, tokenizer, sources, targets, method="prompt", max_steps=1)


def test_best_of_n_on_a_seq2seq_base(seq2seq_with_tokenizer):
    from dinado.baselines import best_of_n

    model, tokenizer = seq2seq_with_tokenizer
    chosen, info = best_of_n(
        model, tokenizer, ["the cat", "you are"], 4, lambda p, c: [float(len(x)) for x in c], 5, seed=0
    )
    assert len(chosen) == 2 and info["oracle_calls"] == 8
    assert all(isinstance(c, str) for c in chosen)


def test_base_perplexity_of_a_seq2seq_model_scores_the_completion_given_the_source(seq2seq_with_tokenizer):
    from dinado.evaluation import base_perplexity

    model, tokenizer = seq2seq_with_tokenizer
    src = tokenizer("the cat sat")["input_ids"] + [0]
    tgt = tokenizer("der Hund")["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([[0, *tgt]])).logits
    lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, torch.tensor(tgt)[:, None])
    expected = float(torch.exp(-lp.mean()))
    got = base_perplexity(model, tokenizer, ["the cat sat", "you are kind to me"], ["der Hund", "der Hund"])
    other = base_perplexity(model, tokenizer, ["the cat sat"], ["der Hund"])
    assert abs(other - expected) < 1e-3 * expected and abs(got - expected) > 1e-3  # the source matters
