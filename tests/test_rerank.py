"""The guide's value of whole completions, and beam search's final beams reranked by it (no oracle call)."""

import pytest
import torch

from dinado import VARIANTS, Guide, SampleSet
from dinado.data import pad_prompts
from dinado.hf import decoder_start_token_id, is_encoder_decoder
from dinado.objectives import sequence_log_values
from dinado.text import encode_prompts, generate_texts, new_tokens, rerank_by_value

from .conftest import CAUSAL_KINDS, randomize_guide, tiny_causal
from .test_evaluation import _model_in_training_mode

# prompts and completions of different lengths (EOS = 0 ends two of them), so that batches are padded
PROMPTS = [[3, 4, 5], [7, 1], [2]]
COMPLETIONS = [[6, 0], [9, 9, 10, 2, 0], [5]]


def _guide(variant, kind="gpt2"):
    guide = Guide.create(tiny_causal(kind, vocab_size=12), variant)
    randomize_guide(guide)
    return guide.eval()


def _value_alone(guide, prompt, completion) -> float:
    """log R_theta at the last prefix of one unpadded row, read off the guide's full value table."""
    ids = torch.tensor([prompt + completion])
    completion_mask = torch.tensor([[0] * len(prompt) + [1] * len(completion)])
    with torch.no_grad():
        raw = guide(ids)
        log_values, _ = guide.parameterization.log_values(
            raw.log_p, raw.direction, raw.norm, ids, completion_mask
        )
    return float(log_values[0, -2, ids[0, -1]])


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_value_is_its_own_completion_s_whatever_the_batch(variant, kind):
    guide = _guide(variant, kind)
    samples = SampleSet.from_token_ids(PROMPTS, COMPLETIONS, [0.0] * len(PROMPTS))
    for batch_size in (1, 2, 3):
        got = sequence_log_values(guide, samples, batch_size=batch_size)
        assert got.shape == (len(PROMPTS),)
        for i, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS, strict=True)):
            assert abs(float(got[i]) - _value_alone(guide, prompt, completion)) < 1e-5, (
                variant,
                batch_size,
                i,
            )
    assert (
        float(got.max() - got.min()) > 1e-3
    )  # the values differ: the rerank tests below can tell picks apart


def test_values_leave_the_guide_s_modes_and_gradients_alone():
    guide = _guide("dinado-merge").train()
    modes = [m.training for m in guide.modules()]
    samples = SampleSet.from_token_ids(PROMPTS, COMPLETIONS, [0.0] * len(PROMPTS))
    values = sequence_log_values(guide, samples)
    assert not values.requires_grad
    assert [m.training for m in guide.modules()] == modes


def test_rerank_picks_the_highest_value_and_the_earlier_candidate_on_a_tie():
    guide = _guide("dinado-soft")
    first = [[6, 0], [9, 9, 10, 2, 0], [5], [4, 4, 0]]
    groups = [first, [[1, 2], [1, 2]]]  # the second prompt's two candidates are the same: a tie
    values = sequence_log_values(guide, SampleSet.from_token_ids([PROMPTS[0]] * 4, first, [0.0] * 4))
    assert rerank_by_value(guide, PROMPTS[:2], groups, batch_size=3) == [int(values.argmax()), 0]


def test_rerank_refuses_mismatched_or_empty_candidates():
    guide = _guide("dinado-soft")
    with pytest.raises(ValueError, match="2 prompts but 1 candidate lists"):
        rerank_by_value(guide, PROMPTS[:2], [[[1]]])
    with pytest.raises(ValueError, match="prompt 1 has no candidate completion"):
        rerank_by_value(guide, PROMPTS[:2], [[[1]], []])
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        sequence_log_values(guide, SampleSet.from_token_ids(PROMPTS, COMPLETIONS, [0.0] * 3), batch_size=0)


def _beams_by_hand(model, tokenizer, guide, prompts, beams, max_new_tokens, batch_size):
    """Every final beam of each prompt (plain generate over the same padded batches), each beam's value read one
    prompt at a time, and the text of the best: the reference."""
    seq2seq = is_encoder_decoder(model)
    rows = encode_prompts(tokenizer, prompts, seq2seq)
    eos = model.generation_config.eos_token_id
    meta = {"decoder_start_token_id": decoder_start_token_id(model)} if seq2seq else None
    texts = []
    for i in range(0, len(rows), batch_size):
        ids, mask = pad_prompts(rows[i : i + batch_size], tokenizer.pad_token_id, seq2seq)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=mask,
                num_beams=beams,
                num_return_sequences=beams,
                do_sample=False,
                max_new_tokens=max_new_tokens,
            )
        gen = new_tokens(out, ids.shape[1], seq2seq).tolist()
        for j, row in enumerate(rows[i : i + batch_size]):
            group = gen[j * beams : (j + 1) * beams]
            candidates = [g[: g.index(eos) + 1] if eos in g else g for g in group]
            samples = SampleSet.from_token_ids([row] * beams, candidates, [0.0] * beams, metadata=meta)
            best = int(sequence_log_values(guide, samples).argmax())
            texts.append((tokenizer.decode(group[best], skip_special_tokens=True).strip(), best))
    return texts


@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_generate_texts_returns_the_beam_with_the_highest_value(kind):
    model, tokenizer = _model_in_training_mode(kind)
    model.eval()
    guide = Guide.create(model, "dinado-soft")
    randomize_guide(guide)
    prompts = ["the cat", "a dog ran", "birds", "the dog sat", "a cat", "birds ran home"]
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    got, count, _ = generate_texts(model, tokenizer, prompts, batch_size=4, rerank=guide, **kwargs)
    expected = _beams_by_hand(model, tokenizer, guide, prompts, 3, 6, batch_size=4)
    assert got == [text for text, _ in expected]
    assert any(best != 0 for _, best in expected), "every pick is the top beam: the test cannot fail"
    top, _, _ = generate_texts(model, tokenizer, prompts, batch_size=4, **kwargs)
    assert top != got and count > 0


def test_generate_texts_refuses_a_rerank_without_beams():
    model, tokenizer = _model_in_training_mode("causal")
    guide = Guide.create(model, "dinado-soft")
    for kwargs, message in (
        (dict(num_beams=1), "needs num_beams >= 2"),
        (dict(num_beams=3, do_sample=True), "needs num_beams >= 2 and no sampling"),
        (dict(num_beams=3, num_return_sequences=3), "leave num_return_sequences unset"),
    ):
        with pytest.raises(ValueError, match=message):
            generate_texts(model, tokenizer, ["the cat"], rerank=guide, max_new_tokens=4, **kwargs)
