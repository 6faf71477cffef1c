import pytest
import torch
from transformers import GPT2LMHeadModel

import dinado
from dinado import Guide

from .conftest import randomize_guide, tiny_gpt2


@pytest.fixture
def merge_guide():
    guide = Guide.create(tiny_gpt2(), "dinado-merge", lora_r=4)
    randomize_guide(guide)
    return guide.eval()


def test_merged_logits_equal_adapter_logits_and_parameter_count_equals_base(merge_guide):
    base_count = sum(p.numel() for p in tiny_gpt2().parameters())
    merged = merge_guide.merge()
    assert type(merged) is GPT2LMHeadModel
    assert sum(p.numel() for p in merged.parameters()) == base_count
    ids = torch.randint(0, 40, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        adapted = merge_guide.base(input_ids=ids).logits
        plain = merged(input_ids=ids).logits
        base_logits = merge_guide.base.get_base_model()(input_ids=ids).logits
        with merge_guide.base.disable_adapter():
            frozen = merge_guide.base(input_ids=ids).logits
    assert (adapted - plain).abs().max() < 1e-4
    assert (adapted - frozen).abs().max() > 1e-2  # the adapter does something
    assert (base_logits - adapted).abs().max() < 1e-4  # merging did not touch the guide's own model


def test_merged_model_decodes_q_theta(merge_guide):
    merged = merge_guide.merge()
    ids = torch.tensor([[0, 5, 6]])
    with torch.no_grad():
        log_q = merge_guide.next_token_logprobs(ids)
        out = merged.generate(
            ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True
        )
        guided = dinado.generate(merge_guide, ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out.sequences, guided)
    step0 = torch.log_softmax(out.scores[0], -1)
    assert (step0 - log_q[:, -1]).abs().max() < 1e-4


def test_merge_is_only_for_the_merge_variant():
    with pytest.raises(ValueError, match="merge\\(\\) needs variant 'dinado-merge'"):
        Guide.create(tiny_gpt2(), "dinado-soft").merge()


def test_lora_b_starts_at_zero():
    guide = Guide.create(tiny_gpt2(), "dinado-merge")
    b = [p for n, p in guide.named_parameters() if "lora_B" in n]
    assert b and all(torch.count_nonzero(p.detach()) == 0 for p in b)
