import copy

import pytest
import torch
from transformers import LogitsProcessor

import dinado
from dinado import VARIANTS, Guide
from dinado.decoding import GuideLogitsProcessor

from .conftest import CAUSAL_KINDS, randomize_guide, tiny_causal, with_dropout

PROMPTS = torch.tensor([[0, 0, 3, 4, 5], [0, 7, 1, 2, 8]])  # two prompts of different lengths, left-padded
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])

MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0),
    "beam3": dict(num_beams=3, do_sample=False),
    "beam3-nocache": dict(num_beams=3, do_sample=False, use_cache=False),
}


class Recorder(LogitsProcessor):
    """Placed after the guide's processor: keeps what it hands on, step by step."""

    def __init__(self):
        self.steps = []

    def __call__(self, input_ids, scores):
        self.steps.append((input_ids.clone(), scores.clone()))
        return scores


def _trained_like_guide(variant, kind="gpt2"):
    guide = Guide.create(tiny_causal(kind, vocab_size=12), variant)
    randomize_guide(guide)
    return guide.eval()


def _check_steps(guide, steps, prompt_len, **options):
    assert steps, "the processor was never called"
    worst = 0.0
    for ids, scores in steps:
        rows = ids.shape[0]
        mask = torch.cat(
            [
                MASK.repeat_interleave(rows // 2, 0),
                torch.ones(rows, ids.shape[1] - prompt_len, dtype=torch.long),
            ],
            1,
        )
        with torch.no_grad():
            ref = guide.next_token_logprobs(ids, mask, **options)[:, -1]
        worst = max(worst, (ref - scores).abs().max().item())
    return worst


def decoded_steps(guide, mode, **options):
    """Decode PROMPTS with the guide (a mode of MODES): the processor's output at every step."""
    recorder = Recorder()
    torch.manual_seed(0)
    kwargs = {"max_new_tokens": 6, **options, **MODES[mode]}
    dinado.generate(guide, PROMPTS, MASK, logits_processor=[recorder], **kwargs)
    assert len(recorder.steps) >= 2
    return recorder.steps


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_equals_next_token_logprobs_at_every_step(variant, mode, kind):
    guide = _trained_like_guide(variant, kind)
    assert _check_steps(guide, decoded_steps(guide, mode), PROMPTS.shape[1]) < 1e-4


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("variant", ["nado", "dinado-soft"])
def test_processor_without_its_cache_gives_the_same_steps(variant, kind):
    guide = _trained_like_guide(variant, kind)
    recorder = Recorder()
    processor = GuideLogitsProcessor(guide, MASK, use_cache=False)
    with processor:
        guide.base.generate(
            input_ids=PROMPTS,
            attention_mask=MASK,
            logits_processor=[processor, recorder],
            max_new_tokens=6,
            num_beams=3,
            do_sample=False,
        )
    assert _check_steps(guide, recorder.steps, PROMPTS.shape[1]) < 1e-4


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("mode", ["sampling", "beam3"])
def test_chunked_prefill_reads_every_chunk(mode, kind):
    # generate(prefill_chunk_size=2) runs the base over the prompt in pieces before the first step
    guide = _trained_like_guide("dinado-soft", kind)
    steps = decoded_steps(guide, mode, prefill_chunk_size=2)
    assert _check_steps(guide, steps, PROMPTS.shape[1]) < 1e-4


@pytest.mark.parametrize("option", ["assistant_model", "prompt_lookup_num_tokens"])
def test_assisted_decoding_is_refused_with_the_reason(option):
    guide = _trained_like_guide("dinado-soft")
    value = tiny_causal("gpt2", vocab_size=12) if option == "assistant_model" else 2
    with pytest.raises(ValueError, match="assisted \\(speculative\\) decoding"):
        dinado.generate(guide, PROMPTS, MASK, max_new_tokens=3, **{option: value})


def test_a_step_that_saw_the_wrong_positions_fails_loudly():
    guide = _trained_like_guide("dinado-soft")
    processor = GuideLogitsProcessor(guide, MASK)
    with processor, torch.no_grad():
        scores = guide.base(PROMPTS, attention_mask=MASK).logits[:, -1]
        processor(PROMPTS, scores)  # a prefill that read the 5 prompt positions: fine
    with processor, torch.no_grad():
        guide.base(PROMPTS, attention_mask=MASK)
        guide.base(PROMPTS, attention_mask=MASK)  # two passes: 10 positions for a 5-token sequence
        with pytest.raises(RuntimeError, match="covered \\(2, 10\\) \\(rows, positions\\)"):
            processor(PROMPTS, scores)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_beam_search_really_reorders_beams_in_this_setting(kind):
    """Guards the reorder test above: some step must hand a beam a different parent than its own row."""
    guide = _trained_like_guide("dinado-soft", kind)
    recorder = Recorder()
    dinado.generate(guide, PROMPTS, MASK, logits_processor=[recorder], max_new_tokens=6, num_beams=3)
    moved = any(
        not torch.equal(recorder.steps[i + 1][0][:, :-1], recorder.steps[i][0])
        for i in range(len(recorder.steps) - 1)
    )
    assert moved


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_guidance_changes_generation_and_alpha_zero_recovers_the_base(kind):
    # strong guidance (scale 1): with weak random guidance greedy decoding of the peaked tiny base may not change
    guide = Guide.create(tiny_causal(kind, vocab_size=12), "nado")
    randomize_guide(guide, scale=1.0)
    guide.eval()
    kwargs = dict(max_new_tokens=6, do_sample=False)
    base_out = guide.base.generate(PROMPTS, attention_mask=MASK, **kwargs)
    alpha0 = dinado.generate(guide, PROMPTS, MASK, alpha=0.0, **kwargs)
    guided = dinado.generate(guide, PROMPTS, MASK, **kwargs)
    assert torch.equal(base_out, alpha0)
    assert not torch.equal(base_out, guided)


def test_processor_outside_its_context_says_how_to_use_it():
    guide = _trained_like_guide("nado")
    processor = GuideLogitsProcessor(guide, MASK)
    with pytest.raises(RuntimeError, match="inside `with processor:`"):
        processor(PROMPTS, torch.zeros(2, 12))


def test_merge_refuses_alpha_other_than_one():
    guide = _trained_like_guide("dinado-merge")
    with pytest.raises(ValueError, match="alpha != 1 is not available for dinado-merge") as err:
        dinado.generate(guide, PROMPTS, MASK, alpha=2.0, max_new_tokens=2)
    assert "adapter_scale" in str(err.value) and "dinado merge --adapter-scale" in str(err.value)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("mode", ["greedy", "beam3"])
def test_generate_decodes_in_eval_mode_and_restores_every_submodule_mode(mode, kind):
    guide = _trained_like_guide("dinado-soft", kind)
    with_dropout(guide)  # training mode, with dropout in the guide's own module
    guide.module.body.h[0].eval()  # a mixed state the call must give back as it was
    modes = [m.training for m in guide.modules()]
    reference = copy.deepcopy(guide).eval()
    kwargs = dict(attention_mask=MASK, max_new_tokens=6, pad_token_id=0, **MODES[mode])
    out = dinado.generate(guide, PROMPTS, **kwargs)
    assert torch.equal(out, dinado.generate(reference, PROMPTS, **kwargs))
    assert [m.training for m in guide.modules()] == modes
    assert guide.training and not guide.module.body.h[0].training and not guide.base.training


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_row_of_a_left_padded_batch_gets_what_it_gets_alone(variant, kind):
    """Position ids from the mask (GPT-2's learned positions, Llama's rotary ones, the guide module's own)."""
    guide = _trained_like_guide(variant, kind)
    kwargs = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        batch_q = guide.next_token_logprobs(PROMPTS, MASK)
        batch_out = dinado.generate(guide, PROMPTS, MASK, **kwargs)
    for row in range(PROMPTS.shape[0]):
        real = MASK[row].bool()
        alone = PROMPTS[row, real][None]
        with torch.no_grad():
            alone_q = guide.next_token_logprobs(alone)
            alone_out = dinado.generate(guide, alone, **kwargs)
        assert (batch_q[row, real] - alone_q[0]).abs().max() < 1e-5
        # alone, generation stops at EOS; in the batch a finished row is padded until every row is done
        new_alone, new_batch = alone_out[0, alone.shape[1] :], batch_out[row, PROMPTS.shape[1] :]
        pad = guide.base.generation_config.pad_token_id
        assert torch.equal(new_batch[: len(new_alone)], new_alone)
        assert bool((new_batch[len(new_alone) :] == pad).all())
