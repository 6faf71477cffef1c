import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers.pytorch_utils import Conv1D

import dinado
from dinado import Guide

from .conftest import CAUSAL_KINDS, randomize_guide, tiny_causal, tiny_gpt2

PROMPTS = torch.tensor([[0, 0, 3, 4, 5], [0, 7, 1, 2, 8]])  # left-padded
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


@pytest.fixture(params=CAUSAL_KINDS)
def kind(request):
    return request.param


@pytest.fixture
def merge_guide(kind):
    guide = Guide.create(tiny_causal(kind), "dinado-merge", lora_r=4)
    randomize_guide(guide)
    return guide.eval()


def test_merged_logits_equal_adapter_logits_and_parameter_count_equals_base(merge_guide, kind):
    reference = tiny_causal(kind)
    merged = merge_guide.merge()
    assert type(merged) is type(reference)
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in reference.parameters())
    if reference.config.tie_word_embeddings:  # SmolLM2 (and GPT-2): the LM head is the embedding matrix
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
    ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = merge_guide.base(input_ids=ids).logits
        plain = merged(input_ids=ids).logits
        base_logits = merge_guide.base.get_base_model()(input_ids=ids).logits
        with merge_guide.base.disable_adapter():
            frozen = merge_guide.base(input_ids=ids).logits
        p_logits = reference(input_ids=ids).logits
    assert (adapted - plain).abs().max() < 1e-4
    assert (adapted - frozen).abs().max() > 1e-2  # the adapter does something
    assert (frozen - p_logits).abs().max() < 1e-5  # and is off when disabled
    assert (base_logits - adapted).abs().max() < 1e-4  # merging did not touch the guide's own model


def test_merge_with_an_adapter_scale_folds_in_that_multiple_of_the_weight_change(merge_guide, kind):
    """adapter_scale s merges W + s * dW: 0 is the base, 1 is q_theta, 2 doubles every adapted weight's change;
    the guide keeps its own scale."""
    reference = tiny_causal(kind)
    base_weights = {k: v.clone() for k, v in reference.state_dict().items()}
    one = merge_guide.merge().state_dict()
    changed = [k for k in one if (one[k] - base_weights[k]).abs().max() > 1e-6]
    assert changed  # the adapter changes some weights
    for scale in (0.0, 2.0, 0.5):
        merged = merge_guide.merge(adapter_scale=scale).state_dict()
        for k in one:
            expected = base_weights[k] + scale * (one[k] - base_weights[k])
            assert (merged[k] - expected).abs().max() < 1e-5, (scale, k)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # the guide itself still decodes q_theta at scale 1
        assert (
            merge_guide.base(input_ids=ids).logits - merge_guide.merge()(input_ids=ids).logits
        ).abs().max() < 1e-4
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="adapter_scale must be"):
            merge_guide.merge(adapter_scale=bad)


def test_merged_model_decodes_q_theta(merge_guide):
    merged = merge_guide.merge()
    kwargs = dict(max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        log_q = merge_guide.next_token_logprobs(PROMPTS, MASK)
        out = merged.generate(
            PROMPTS, attention_mask=MASK, return_dict_in_generate=True, output_scores=True, **kwargs
        )
        guided = dinado.generate(merge_guide, PROMPTS, MASK, **kwargs)
    assert torch.equal(out.sequences, guided)
    step0 = torch.log_softmax(out.scores[0], -1)
    assert (step0 - log_q[:, -1]).abs().max() < 1e-4
    for t in range(1, len(out.scores)):  # every later step too: log q of the generated prefix
        ids = out.sequences[:, : PROMPTS.shape[1] + t]
        mask = torch.cat([MASK, torch.ones(2, t, dtype=torch.long)], 1)
        with torch.no_grad():
            ref = merge_guide.next_token_logprobs(ids, mask)[:, -1]
        assert (torch.log_softmax(out.scores[t], -1) - ref).abs().max() < 1e-4


def test_all_linear_adapts_every_projection_but_the_lm_head(kind):
    base = tiny_causal(kind)
    projections = {
        name
        for name, m in base.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not base.get_output_embeddings()
    }
    guide = Guide.create(base, "dinado-merge")
    inner = guide.base.get_base_model()
    adapted = {name for name, m in inner.named_modules() if isinstance(m, LoraLayer)}
    assert projections and adapted == projections
    assert not isinstance(inner.get_output_embeddings(), LoraLayer)


def test_merge_is_only_for_the_merge_variant():
    with pytest.raises(ValueError, match="merge\\(\\) needs variant 'dinado-merge'"):
        Guide.create(tiny_gpt2(), "dinado-soft").merge()


def test_lora_b_starts_at_zero(kind):
    guide = Guide.create(tiny_causal(kind), "dinado-merge")
    b = [p for n, p in guide.named_parameters() if "lora_B" in n]
    assert b and all(torch.count_nonzero(p.detach()) == 0 for p in b)


def _with_quantizer(model, **config):
    """Mark ``model`` as transformers marks a model loaded through a quantizer (``model.hf_quantizer``)."""
    from types import SimpleNamespace

    model.hf_quantizer = SimpleNamespace(quantization_config=SimpleNamespace(**config))
    return model


@pytest.mark.parametrize(
    "quantization, merges",
    [
        # what transformers 5.x gives for SmolLM2's GGUF file when it has no matmul kernel: float weights
        (dict(quant_method="gguf", dequantize=False), True),
        (dict(quant_method="fp8", dequantize=True), True),  # unpacked at load time
        (dict(quant_method="fp8", dequantize=False), False),
        (dict(quant_method="bitsandbytes_4bit"), False),
    ],
)
def test_merge_refuses_only_weights_that_are_really_quantised(quantization, merges):
    guide = Guide.create(_with_quantizer(tiny_causal("llama"), **quantization), "dinado-merge", lora_r=4)
    randomize_guide(guide)
    if not merges:
        with pytest.raises(ValueError, match="quantised weights"):
            guide.merge()
        return
    merged = guide.eval().merge()
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(ids).logits.log_softmax(-1) - guide.next_token_logprobs(ids)).abs().max() < 1e-4


def test_merge_refuses_weights_packed_in_integer_blocks():
    guide = Guide.create(tiny_causal("llama"), "dinado-merge", lora_r=4)
    inner = guide.base.get_base_model()
    inner.model.norm.weight = torch.nn.Parameter(torch.zeros(32, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match="quantised weights"):
        guide.merge()
