import pytest
import torch
import torch.nn.functional as F

import dinado
from dinado import VARIANTS, Guide, SampleSet
from dinado.hf import shared_weight_copy, unwrap_peft
from dinado.objectives import prefix_log_values

from .conftest import (
    CAUSAL_KINDS,
    SEQ2SEQ_KINDS,
    randomize_guide,
    tiny_causal,
    tiny_gpt2,
    tiny_llama,
    tiny_seq2seq,
    with_dropout,
)


def _batch():
    ids = torch.tensor([[0, 5, 9, 0, 3, 7, 1, 0], [0, 0, 2, 8, 4, 6, 0, 0]])  # EOS (0) inside, and as pad
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_q_equals_p_at_initialisation(variant, kind):
    base = tiny_causal(kind)
    ids, mask = _batch()
    with torch.no_grad():
        log_p = F.log_softmax(
            base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits,
            -1,
        )
        guide = Guide.create(base, variant)
        log_q = guide.next_token_logprobs(ids, mask)
    real = mask.bool()
    assert (log_q - log_p)[real].abs().max() < 1e-5


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("variant", ["dinado-hard", "dinado-merge"])
def test_hard_consistency_satisfies_bellman_identically_at_random_parameters(variant, kind):
    options = {"consistency": "hard"} if variant == "dinado-merge" else {}
    guide = Guide.create(tiny_causal(kind), variant, **options)
    randomize_guide(guide)
    ids = torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0
    completion = torch.zeros_like(ids)
    completion[:, 3:] = 1
    with torch.no_grad():
        out = guide(ids)
        log_values, log_root = guide.parameterization.log_values(
            out.log_p, out.direction, out.norm, ids, completion
        )
        log_r = prefix_log_values(log_values, ids)  # R(x_<=t) at index t-1
        log_s = torch.logsumexp(out.log_p + log_values, dim=-1)  # sum_v p(v|x_<=t) R(x_<=t + v)
    # the values must actually vary, or the identity below would hold trivially
    assert log_r[:, 2:].std() > 0.05
    residual = (log_s[:, 3:-1] - log_r[:, 2:-1]).exp() - 1.0  # completion prefixes x_<=t, t = 3..L-2
    assert residual.abs().max() < 1e-4
    root_residual = (log_s[:, 2] - log_root).exp() - 1.0  # R(c) = sum_v p(v|c) R(c + v)
    assert root_residual.abs().max() < 1e-4


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_soft_variants_are_not_consistent_by_construction(kind):
    """The same residual for DiNADO-Soft at random parameters is large: the Hard test above can fail."""
    guide = Guide.create(tiny_causal(kind), "dinado-soft")
    randomize_guide(guide)
    ids = torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    completion = torch.zeros_like(ids)
    completion[:, 3:] = 1
    with torch.no_grad():
        out = guide(ids)
        log_values, _ = guide.parameterization.log_values(out.log_p, out.direction, out.norm, ids, completion)
        residual = (
            torch.logsumexp(out.log_p + log_values, -1)[:, 3:-1] - prefix_log_values(log_values, ids)[:, 2:-1]
        )
    assert residual.abs().max() > 1e-2


def test_base_stays_frozen_and_in_eval_mode():
    guide = Guide.create(tiny_gpt2(), "dinado-soft")
    guide.train()
    assert not guide.base.training and not any(m.training for m in guide.base.modules())
    assert not any(p.requires_grad for p in guide.base.parameters())
    assert all(p.requires_grad for p in guide.module.parameters())


def _caller_state(model):
    return (
        [(name, type(m)) for name, m in model.named_modules()],
        [m.training for m in model.modules()],
        [(name, p.requires_grad, p.grad is None) for name, p in model.named_parameters()],
    )


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_the_callers_base_keeps_computing_p_and_keeps_its_flags(tmp_path, variant, kind):
    """Review 4(e): creating, training, decoding with and loading a guide must not touch the caller's model."""
    base = with_dropout(tiny_causal(kind), 0.0)  # training mode, yet deterministic
    first_block = base.transformer.h[0] if kind == "gpt2" else base.model.layers[0]
    first_block.eval().requires_grad_(False)  # mixed modes and flags, as a caller may leave them
    ids = torch.randint(1, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(ids).logits
    state = _caller_state(base)

    guide = Guide.create(base, variant, num_layers=1, lora_r=4)
    randomize_guide(guide)
    samples = SampleSet.from_token_ids(ids[:, :3].tolist(), ids[:, 3:].tolist(), [1.0, 0.0, 1.0])
    dinado.train(guide, samples, max_steps=1, batch_size=3)
    dinado.generate(guide, ids[:, :3], max_new_tokens=3, do_sample=False)
    guide.save_pretrained(tmp_path)
    loaded = Guide.from_pretrained(tmp_path, base)
    if variant == "dinado-merge":
        guide.merge()
    with torch.no_grad():
        assert (
            loaded.eval().next_token_logprobs(ids) - guide.eval().next_token_logprobs(ids)
        ).abs().max() < 1e-6
        log_q = guide.eval().next_token_logprobs(ids)
        log_p = guide(ids).log_p
        after = base(ids).logits
    assert (log_q - log_p).abs().max() > 1e-2  # the trained guide really moves away from p
    assert (F.log_softmax(before, -1) - log_p).abs().max() < 1e-5  # and still reads p from the same weights
    assert (after - before).abs().max() < 1e-6
    assert _caller_state(base) == state

    base.train()  # and what the caller does to its model afterwards does not reach the guide's frozen base
    base.requires_grad_(True)
    assert not any(m.training for m in guide.base.modules())
    assert not any(
        p.requires_grad for name, p in unwrap_peft(guide.base).named_parameters() if "lora_" not in name
    )


def test_unknown_variant_and_option_are_refused():
    with pytest.raises(ValueError, match="unknown variant 'dinado'.*nado, dinado-hard"):
        Guide.create(tiny_gpt2(), "dinado")
    with pytest.raises(TypeError, match="unknown Guide option.*num_layer\\b"):
        Guide.create(tiny_gpt2(), "nado", num_layer=3)
    with pytest.raises(ValueError, match="fixes consistency"):
        Guide.create(tiny_gpt2(), "dinado-soft", consistency="hard")


@pytest.mark.parametrize("variant", ["dinado-soft", "dinado-merge"])
def test_a_seeded_guide_starts_the_same_whatever_ran_before_and_leaves_the_global_state(variant):
    base = tiny_gpt2()
    options = {"lora_r": 2} if variant == "dinado-merge" else {"num_layers": 1}
    state = lambda g: {k: v.detach().clone() for k, v in g.trainable_state().items()}  # noqa: E731
    torch.manual_seed(0)
    first = state(Guide.create(base, variant, seed=3, **options))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)  # the global random state was not used
    torch.manual_seed(123)  # another global state: the same seeded guide
    again = state(Guide.create(base, variant, seed=3, **options))
    other = state(Guide.create(base, variant, seed=4, **options))
    random_params = [k for k in first if first[k].abs().sum() > 0]
    assert random_params and all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in random_params)
    with pytest.raises(TypeError, match="seed must be an int"):
        Guide.create(base, variant, seed="3", **options)


@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
@pytest.mark.parametrize("variant", ["dinado-soft", "dinado-merge"])
def test_a_guide_over_an_encoder_decoder_base_leaves_the_callers_model_untouched(variant, kind):
    base = with_dropout(tiny_seq2seq(kind), 0.0)
    src = torch.randint(2, 24, (2, 6), generator=torch.Generator().manual_seed(0))
    dec = torch.cat([torch.zeros(2, 1, dtype=torch.long), src[:, :4]], 1)
    with torch.no_grad():
        before = base(input_ids=src, decoder_input_ids=dec).logits
    state = _caller_state(base)
    guide = Guide.create(base, variant, num_layers=1, lora_r=4)
    randomize_guide(guide)
    with torch.no_grad():
        out = guide.eval()(dec, encoder_input_ids=src)
        log_q = guide.next_token_logprobs(dec, encoder_input_ids=src)
        after = base(input_ids=src, decoder_input_ids=dec).logits
    assert (log_q - out.log_p).abs().max() > 1e-2
    assert (after - before).abs().max() < 1e-6
    assert _caller_state(base) == state


def _sharing_pattern(model):
    """Which parameter and module names are the same object (tied weights, shared embeddings)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append("p:" + name)
    for name, m in model.named_modules(remove_duplicate=False):
        groups.setdefault(id(m), []).append("m:" + name)
    return sorted(sorted(names) for names in groups.values())


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5"])
def test_shared_weight_copy_is_a_new_module_tree_over_the_same_weight_memory(kind):
    model = tiny_seq2seq("t5") if kind == "t5" else tiny_causal(kind)
    copied = shared_weight_copy(model)
    assert not {id(m) for m in model.modules()} & {id(m) for m in copied.modules()}
    pairs = list(zip(model.parameters(), copied.parameters(), strict=True))
    assert all(a is not b and a.data_ptr() == b.data_ptr() and a.shape == b.shape for a, b in pairs)
    assert _sharing_pattern(copied) == _sharing_pattern(model)  # ties kept (Llama/T5 embeddings, T5 `shared`)
    assert any(len(names) > 1 for names in _sharing_pattern(model))  # ... and there are ties to keep
    assert copied.config is model.config and copied.generation_config is model.generation_config
    copied.train()
    copied.requires_grad_(False)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    ids = torch.randint(1, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(decoder_input_ids=ids) if kind == "t5" else {}
    copied.eval()
    with torch.no_grad():
        assert (model(ids, **kwargs).logits - copied(ids, **kwargs).logits).abs().max() < 1e-6


def test_merge_guide_over_a_base_with_accelerate_hooks_adapts_only_its_copy():
    """accelerate (device_map=...) replaces a module's forward by a partial bound to that module: the copy's
    forward must run the copy (with its LoRA layers), not the caller's module."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    calls = []

    class Count(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            calls.append(module)
            return args, kwargs

    base = tiny_causal("llama")
    for module in (base, base.model.layers[0], base.model.layers[0].self_attn.q_proj):
        add_hook_to_module(module, Count())
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = base(ids).logits
    guide = Guide.create(base, "dinado-merge", lora_r=4)
    randomize_guide(guide)
    calls.clear()
    with torch.no_grad():
        out = guide.eval()(ids)
        log_q = guide.next_token_logprobs(ids)
        after = base(ids).logits
    assert (out.log_p - F.log_softmax(before, -1)).abs().max() < 1e-5
    assert (log_q - out.log_p).abs().max() > 1e-2  # the adapter acts in the guide
    assert (after - before).abs().max() < 1e-6  # but not in the caller's model
    # the hooks still run: 3 hooked modules, 4 base passes in the guide (p and q, twice) and 1 in the caller
    assert len(calls) == 3 * 5
    own = {id(m) for m in guide.modules()}
    assert sum(id(m) in own for m in calls) == 3 * 4


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_guide_is_built_on_the_device_of_its_base(variant):
    # a base on another device (a GPU; here the meta device, which holds no data) gets its module, norm head
    # and LoRA adapter there too, not on the CPU where new modules are born
    from dinado.guide import GuideConfig

    base = tiny_llama().to("meta")
    options = {"lora_r": 4, "lora_alpha": 8} if variant == "dinado-merge" else {}
    guide = Guide(base, GuideConfig(variant=variant, base_vocab_size=40, base_hidden_size=32, **options))
    assert {p.device.type for p in guide.parameters()} == {"meta"}
