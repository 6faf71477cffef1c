"""Cached base features (dinado.features): the loss and gradients of the uncached path, without the base."""

import copy
import math
import warnings

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import dinado
from dinado import Guide, SampleSet, features
from dinado.features import FeatureCache, FeatureCacheError, precompute_features
from dinado.objectives import full_vocabulary_loss, guide_loss

from .conftest import SEQ2SEQ_KINDS, randomize_guide, tiny_gpt2, tiny_seq2seq

MODULE_VARIANTS = ("nado", "dinado-soft", "dinado-hard")


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """SmolLM2's architecture (rotary positions, grouped-query attention, tied embeddings), tiny and random."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.3,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


BASES = {"gpt2": tiny_gpt2, "llama": _tiny_llama}


def _samples(n: int = 12, vocab: int = 40, seq2seq: bool = False, seed: int = 0) -> SampleSet:
    """Prompts and completions of different lengths (padding in every batch), soft labels."""
    g = torch.Generator().manual_seed(seed)
    eos, low = (1, 2) if seq2seq else (0, 1)
    prompts = [
        [0] + torch.randint(low, vocab, (int(k),), generator=g).tolist()
        for k in torch.randint(0, 4, (n,), generator=g)
    ]
    completions = [
        torch.randint(low, vocab, (int(k),), generator=g).tolist() + [eos]
        for k in torch.randint(0, 6, (n,), generator=g)
    ]
    labels = torch.rand(n, generator=g).tolist()
    metadata = {"decoder_start_token_id": 0} if seq2seq else None
    return SampleSet.from_token_ids(prompts, completions, labels, metadata=metadata)


def _grads(loss, guide):
    params = [p for p in guide.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _compare(guide, samples, regularizer_weight=None):
    """(loss, gradients) of the uncached path, the cached path and the reference formula over [B, L, V]."""
    # batches other than the loss's: other padding
    cache = precompute_features(guide, samples, batch_size=5)
    indices = list(range(len(samples)))
    batch = samples.collate(indices)
    reference = full_vocabulary_loss(guide, batch, regularizer_weight)
    uncached = guide_loss(guide, batch, regularizer_weight).loss
    batch.base_hidden = cache.batch_hidden(indices, batch.input_ids.shape[1])
    if cache.metadata["last_hidden"]:  # DiNADO-Merge: log p from the cached last hidden states
        batch.base_last_hidden = cache.batch_hidden(indices, batch.input_ids.shape[1], last=True)
    cached = guide_loss(guide, batch, regularizer_weight).loss
    return [(loss, _grads(loss, guide)) for loss in (reference, uncached, cached)]


def float32_tolerance(guide, samples, reference, floor: float = 1e-5) -> float:
    """How far two float32 evaluation orders of this loss may differ at this point: 4x the change of the reference
    gradients under a 1e-7 relative nudge of the trainable weights (measured on a copy), never below ``floor``.

    At some random points Hard's loss is ill-conditioned (a value R near 1 on a negative sample): there the nudge
    moves the gradients by up to 1e-3 (measured), and any two exact paths differ by as much. A real error (a
    missing input, a wrong row) is of the size of the gradients themselves.
    """
    nudged = copy.deepcopy(guide)
    with torch.no_grad():
        for p in nudged.parameters():
            if p.requires_grad:
                p.mul_(1 + 1e-7 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    again = _compare(nudged, samples)[0]
    sensitivity = max((x - y).abs().max().item() for x, y in zip(again[1], reference[1], strict=True))
    tolerance = max(floor, 4 * sensitivity)
    assert tolerance < 1e-2  # the comparison still means something
    return tolerance


def _assert_close(a, b, tolerance):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert abs(loss_a.item() - loss_b.item()) <= tolerance
    worst = max((x - y).abs().max().item() for x, y in zip(grads_a, grads_b, strict=True))
    assert worst <= tolerance, worst


@pytest.mark.parametrize("ce_positions", ["all", "terminal"])
@pytest.mark.parametrize("variant", MODULE_VARIANTS)
@pytest.mark.parametrize("kind", list(BASES))
def test_cached_features_give_the_loss_and_gradients_of_the_uncached_path(kind, variant, ce_positions):
    guide = Guide.create(BASES[kind](), variant, ce_positions=ce_positions)
    randomize_guide(guide)
    reference, uncached, cached = _compare(guide, _samples())
    assert max(g.abs().max().item() for g in reference[1]) > 1e-2  # the gradients are not trivially zero
    tolerance = float32_tolerance(guide, _samples(), reference)
    _assert_close(uncached, reference, tolerance)
    _assert_close(cached, uncached, tolerance)


@pytest.mark.parametrize("variant", MODULE_VARIANTS)
def test_cached_path_at_initialisation_shares_tied_maxima_as_torch_does(variant):
    # zero-initialised heads: the direction is 0 at every token, so every token ties for DiNADO-Soft's max
    guide = Guide.create(tiny_gpt2(), variant)
    reference, uncached, cached = _compare(guide, _samples())
    _assert_close(cached, uncached, 1e-6)
    _assert_close(uncached, reference, 1e-6)


@pytest.mark.parametrize("variant", MODULE_VARIANTS)
def test_chunked_and_recomputing_cached_path_is_exact(variant, monkeypatch):
    guide = Guide.create(_tiny_llama(), variant)
    randomize_guide(guide)
    # 7 rows per chunk at most: several chunks
    monkeypatch.setattr(features, "CHUNK_ELEMENTS", 40 * 7)
    monkeypatch.setattr(features, "SAVE_LIMIT_BYTES", 0)  # keep nothing: the backward pass recomputes
    reference, uncached, cached = _compare(guide, _samples())
    _assert_close(cached, uncached, float32_tolerance(guide, _samples(), reference))


def test_nado_without_regulariser_needs_no_full_vocabulary_rows():
    guide = Guide.create(tiny_gpt2(), "nado")
    randomize_guide(guide)
    reference, uncached, cached = _compare(guide, _samples(), regularizer_weight=0.0)
    _assert_close(cached, uncached, 1e-5)
    _assert_close(uncached, reference, 1e-5)


@pytest.mark.parametrize("variant", MODULE_VARIANTS)
@pytest.mark.parametrize("kind", SEQ2SEQ_KINDS)
def test_cached_features_on_encoder_decoder_bases(kind, variant):
    guide = Guide.create(tiny_seq2seq(kind), variant)
    randomize_guide(guide)
    reference, uncached, cached = _compare(guide, _samples(vocab=24, seq2seq=True))
    # T5's rescaled outputs and BART/Marian's final bias go through lm_head_logits; Hard's cumulative ratios
    # carry float32 rounding of larger logits than the decoder-only models' (measured up to 1e-5)
    _assert_close(cached, uncached, 1e-4)


@pytest.mark.parametrize("variant", [*MODULE_VARIANTS, "dinado-merge"])
def test_training_with_cached_features_matches_the_uncached_run(variant):
    # learning rate 0: every step sees the same weights, so losses and gradients compare step by step (Adam's
    # first steps would turn rounding-level differences of near-zero gradients into whole-sized updates)
    samples = _samples(n=24)
    runs = []
    for cache in (False, True):
        options = {"lora_target_modules": TOP_LAYER} if variant == "dinado-merge" else {}
        guide = Guide.create(tiny_gpt2(), variant, **options)
        randomize_guide(guide)
        report = dinado.train(
            guide, samples, max_steps=4, batch_size=8, seed=1, learning_rate=0.0, cache_features=cache
        )
        assert report.cached_features == cache
        grads = {n: p.grad for n, p in guide.named_parameters() if p.grad is not None}
        runs.append((report.loss, grads))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert max(abs(a - b) for a, b in zip(loss_a, loss_b, strict=True)) < 1e-6
    assert len(set(loss_a)) == 4  # four different batches
    assert max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a) < 1e-5


def test_cache_in_bfloat16_and_on_disk(tmp_path):
    guide = Guide.create(_tiny_llama(), "dinado-soft")
    randomize_guide(guide)
    samples = _samples()
    indices = list(range(len(samples)))

    def loss_with(cache: FeatureCache) -> float:
        batch = samples.collate(indices)
        batch.base_hidden = cache.batch_hidden(indices, batch.input_ids.shape[1])
        with torch.no_grad():
            return guide_loss(guide, batch).loss.item()

    memory = precompute_features(guide, samples)
    on_disk = precompute_features(guide, samples, path=tmp_path / "features.safetensors")
    assert "in " in repr(on_disk) and on_disk.dtype == torch.float32 and len(on_disk) == len(samples)
    assert loss_with(on_disk) == pytest.approx(loss_with(memory), abs=1e-7)  # the same values, read per batch
    memory.save(tmp_path / "saved.safetensors")
    assert loss_with(FeatureCache.load(tmp_path / "saved.safetensors")) == pytest.approx(
        loss_with(memory), abs=1e-7
    )
    half = precompute_features(guide, samples, dtype=torch.bfloat16)
    assert half.nbytes * 2 == memory.nbytes
    assert loss_with(half) == pytest.approx(loss_with(memory), rel=2e-2)  # rounded states, same loss to 2%


@pytest.mark.parametrize("variant", ["dinado-soft", "dinado-merge"])
def test_a_cache_subset_equals_the_cache_of_the_subset(variant, tmp_path):
    """FeatureCache.subset: the rows of a second pass over samples.subset(indices), in memory or from a file."""
    options = {"lora_target_modules": TOP_LAYER} if variant == "dinado-merge" else {}
    guide = Guide.create(_tiny_llama(), variant, **options)
    samples = _samples(n=10)
    indices = [7, 2, 2, 9, 0]  # out of order, one twice
    expected = precompute_features(guide, samples.subset(indices))
    on_disk = precompute_features(guide, samples, path=tmp_path / "features.safetensors")
    for cache in (precompute_features(guide, samples), on_disk):
        part = cache.subset(samples, indices)
        assert len(part) == len(indices) and len(cache) == len(samples)  # the whole cache is unchanged
        assert torch.equal(part.offsets, expected.offsets)
        for i in range(len(indices)):
            torch.testing.assert_close(part.rows(i), expected.rows(i), rtol=1e-5, atol=1e-5)
            if variant == "dinado-merge":
                torch.testing.assert_close(part.last_rows(i), expected.last_rows(i), rtol=1e-5, atol=1e-5)
        part.check(guide, samples.subset(indices))  # accepted for the subset, refused for the whole set
        with pytest.raises(FeatureCacheError, match="another sample set"):
            part.check(guide, samples)
    with pytest.raises(FeatureCacheError, match="another sample set than the one given"):
        on_disk.subset(_samples(n=10, seed=4), indices)
    with pytest.raises(IndexError, match="index 10 is outside the cache's 10 samples"):
        on_disk.subset(samples, [0, 10])


def test_a_cache_is_refused_for_other_samples_bases_and_guides():
    samples = _samples()
    guide = Guide.create(tiny_gpt2(), "dinado-soft")
    cache = precompute_features(guide, samples)
    with pytest.raises(FeatureCacheError, match="another sample set"):
        dinado.train(guide, _samples(seed=5), max_steps=1, cache_features=cache)
    with pytest.raises(FeatureCacheError, match="another base"):
        dinado.train(
            Guide.create(tiny_gpt2(seed=3), "dinado-soft"), samples, max_steps=1, cache_features=cache
        )
    top = Guide.create(tiny_gpt2(), "dinado-merge", lora_target_modules=TOP_LAYER)
    with pytest.raises(
        FeatureCacheError, match="last hidden states, and this guide needs the input of decoder layer 1"
    ):
        dinado.train(top, samples, max_steps=1, cache_features=cache)
    everywhere = Guide.create(tiny_gpt2(), "dinado-merge")
    with pytest.raises(
        FeatureCacheError, match="input of decoder layer 1, and this guide needs the input of decoder layer 0"
    ):
        dinado.train(everywhere, samples, max_steps=1, cache_features=precompute_features(top, samples))


@pytest.mark.filterwarnings(
    "ignore:Model has `tie_word_embeddings=True`", "ignore:fan_in_fan_out is set to True"
)
def test_merge_caches_refuse_an_adapter_outside_the_layers_and_encoder_decoder_bases():
    samples = _samples()
    head = Guide.create(tiny_gpt2(), "dinado-merge", lora_target_modules=r".*(h\.1\.attn\.c_attn|lm_head)")
    with pytest.raises(FeatureCacheError, match="lm_head.*outside the decoder layers"):
        dinado.train(head, samples, max_steps=1, cache_features=True)
    assert not dinado.train(head, samples, max_steps=4, batch_size=4).cached_features  # automatic: no cache
    seq2seq = Guide.create(tiny_seq2seq("bart"), "dinado-merge")
    with pytest.raises(FeatureCacheError, match="encoder-decoder base adapts the encoder too"):
        precompute_features(seq2seq, _samples(vocab=24, seq2seq=True))


def test_train_caches_by_itself_when_the_run_visits_every_sample():
    samples = _samples(n=16)
    long_run = dinado.train(Guide.create(tiny_gpt2(), "nado"), samples, max_steps=4, batch_size=4)
    short_run = dinado.train(Guide.create(tiny_gpt2(), "nado"), samples, max_steps=3, batch_size=4)
    merge = dinado.train(Guide.create(tiny_gpt2(), "dinado-merge"), samples, max_steps=4, batch_size=4)
    assert long_run.cached_features and not short_run.cached_features and merge.cached_features


# ---------------------------------------------------------------------------- DiNADO-Merge: the frozen bottom
TOP_LAYER = (
    r".*(h|layers)\.1\..*(c_attn|c_proj|c_fc|_proj)"  # LoRA on the top one of the tiny bases' 2 layers
)


@pytest.mark.parametrize("ce_positions", ["all", "terminal"])
@pytest.mark.parametrize("target", ["top", "all-linear"])
@pytest.mark.parametrize("kind", list(BASES))
def test_merge_cache_gives_the_loss_and_gradients_of_the_uncached_path(kind, target, ce_positions):
    options = {"lora_target_modules": TOP_LAYER} if target == "top" else {}
    guide = Guide.create(BASES[kind](), "dinado-merge", lora_r=4, ce_positions=ce_positions, **options)
    randomize_guide(guide)
    assert precompute_features(guide, _samples()).metadata["layer"] == (1 if target == "top" else 0)
    reference, uncached, cached = _compare(guide, _samples())
    assert max(g.abs().max().item() for g in reference[1]) > 1e-2
    tolerance = float32_tolerance(guide, _samples(), reference)
    _assert_close(uncached, reference, tolerance)
    _assert_close(cached, uncached, tolerance)


@pytest.mark.parametrize("kind", list(BASES))
def test_merge_cache_runs_only_the_layers_from_the_adapted_one_up(kind):
    guide = Guide.create(BASES[kind](), "dinado-merge", lora_r=4, lora_target_modules=TOP_LAYER)
    randomize_guide(guide)
    samples = _samples()
    cache = precompute_features(guide, samples)
    calls = [0, 0]
    layers = features.decoder_layers(guide.base)[1]
    hooks = [
        layer.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    indices = list(range(len(samples)))
    batch = samples.collate(indices)
    batch.base_hidden = cache.batch_hidden(indices, batch.input_ids.shape[1])
    loss = guide_loss(guide, batch).loss
    assert calls == [0, 2]  # the bottom layer never runs; the top one with and without the adapter
    batch.base_last_hidden = cache.batch_hidden(indices, batch.input_ids.shape[1], last=True)
    calls[:] = [0, 0]
    assert abs(guide_loss(guide, batch).loss.item() - loss.item()) < 1e-5  # log p from the cached last states
    assert calls == [0, 1]  # and the top layer runs once, with the adapter
    batch.base_hidden = torch.zeros_like(batch.base_hidden)  # what the top layer reads is the cache
    assert abs(guide_loss(guide, batch).loss.item() - loss.item()) > 1e-3
    for hook in hooks:
        hook.remove()


class _ScaledLogits(GPT2LMHeadModel):
    """A base whose logits are not its LM head of the last hidden state (as Gemma-2's soft-capping or any custom
    head): the cache must not recompute log p from it."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out


def test_a_base_whose_head_the_cache_cannot_reproduce_is_refused():
    base = _ScaledLogits(tiny_gpt2().config).eval()
    guide = Guide.create(base, "dinado-soft")
    samples = _samples(n=8)
    with pytest.raises(FeatureCacheError, match="computes its logits otherwise"):
        precompute_features(guide, samples)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        report = dinado.train(guide, samples, max_steps=4, batch_size=4)  # automatic: falls back, and says so
    assert not report.cached_features
    assert any("training without cached features" in str(w.message) for w in record)


@pytest.mark.parametrize("kind", list(BASES))
def test_one_shared_base_pass_gives_each_guide_its_own_cache(kind, tmp_path):
    samples = _samples()
    base = BASES[kind]()
    merge = Guide.create(base, "dinado-merge", lora_r=4, lora_target_modules=TOP_LAYER)
    everywhere = Guide.create(base, "dinado-merge", lora_r=4)
    soft = Guide.create(base, "dinado-soft")
    randomize_guide(merge)  # a trained adapter must not leak into the others' states
    calls = [0, 0]
    hooks = [
        soft.base.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1)),
        features.decoder_layers(merge.base)[1][0].register_forward_hook(
            lambda *a: calls.__setitem__(1, calls[1] + 1)
        ),
    ]
    shared = dinado.precompute_shared_features([merge, soft, everywhere], samples, batch_size=5)
    for hook in hooks:
        hook.remove()
    # one pass of the frozen base per batch of 5 of the 12 samples; Merge's own copy never runs its bottom layer
    assert calls == [3, 0]
    for guide, cache in zip([merge, soft, everywhere], shared, strict=True):
        alone = precompute_features(guide, samples, batch_size=5)
        assert cache.metadata == alone.metadata
        assert torch.allclose(cache.batch_hidden(range(12), 12), alone.batch_hidden(range(12), 12), atol=1e-6)
        dinado.train(guide, samples, max_steps=1, batch_size=4, cache_features=cache)  # accepted by train
    assert [c.metadata["last_hidden"] for c in shared] == [True, False, True]
    assert [features.estimated_bytes(g, samples) for g in (merge, soft)] == [c.nbytes for c in shared[:2]]
    assert shared[0].batch_hidden(range(12), 12, last=True).equal(shared[1].batch_hidden(range(12), 12))
    shared[0].save(tmp_path / "merge.safetensors")
    for in_memory in (True, False):
        loaded = FeatureCache.load(tmp_path / "merge.safetensors", in_memory=in_memory)
        assert loaded.metadata["last_hidden"] and loaded.nbytes == shared[0].nbytes
        for last in (False, True):
            assert loaded.batch_hidden(range(12), 12, last).equal(shared[0].batch_hidden(range(12), 12, last))
    on_disk = precompute_features(merge, samples, path=tmp_path / "written.safetensors")
    for last in (False, True):
        written, kept = on_disk.batch_hidden(range(12), 12, last), shared[0].batch_hidden(range(12), 12, last)
        assert torch.allclose(written, kept, atol=1e-5)  # other batches: other padding, the same states
    with pytest.raises(FeatureCacheError, match="no last hidden states"):
        shared[1].batch_hidden(range(12), 12, last=True)


def test_a_shared_pass_refuses_guides_on_different_bases():
    samples = _samples()
    guides = [Guide.create(tiny_gpt2(), "dinado-soft"), Guide.create(tiny_gpt2(seed=3), "nado")]
    with pytest.raises(FeatureCacheError, match="different bases"):
        dinado.precompute_shared_features(guides, samples)
    with pytest.raises(ValueError, match="at least one guide"):
        dinado.precompute_shared_features([], samples)


@pytest.mark.parametrize("variant", ["dinado-soft", "nado"])
def test_merge_statistics_match_the_torch_composition_where_the_clamp_and_ties_act(variant):
    from dinado.numerics import LOG_FLOOR
    from dinado.parameterizations import parameterization_for

    param = parameterization_for(variant, "soft")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    logits[0, :20] -= 200.0  # log pi below LOG_FLOOR: the clamp stops the gradient there
    logits[1, 3], logits[1, 5] = logits[1].max() + 50.0, logits[1].max() + 51.0
    log_p = torch.log_softmax(torch.randn(6, 50, generator=g, dtype=torch.float64), dim=-1)
    log_p[1] = -math.log(50.0)
    log_p[1, 5] += 1.0  # the direction ties at tokens 3 and 5 (pi and p both one nat higher at 5)
    following = torch.randint(0, 50, (6,), generator=g)
    following[0] = 5  # a clamped token read by `taken`: its gradient must stop at the clamp
    upstream = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3)]

    ours = logits.clone().requires_grad_()
    lse, mx, taken = features._MergeStats.apply(ours, log_p, following, param)
    theirs = logits.clone().requires_grad_()
    d = torch.log_softmax(theirs, -1).clamp(min=LOG_FLOOR) - log_p.clamp(min=LOG_FLOOR)
    expected = (
        torch.logsumexp(log_p + param.guidance(d), -1),
        d.amax(-1),
        d.gather(-1, following[:, None]).squeeze(-1),
    )
    for got, want in zip((lse, mx, taken), expected, strict=True):
        assert torch.allclose(got, want)
    sum(u @ v for u, v in zip(upstream, (lse, mx, taken), strict=True)).backward()
    sum(u @ v for u, v in zip(upstream, expected, strict=True)).backward()
    assert abs(ours.grad[0, 5].item()) < 1e-20 and abs(ours.grad[1, 3].item()) > 1e-3
    assert torch.allclose(ours.grad, theirs.grad)


def test_merge_statistics_from_hidden_rows_and_a_frozen_head_match_those_from_logits():
    """With ``weight`` the LM head runs inside (into reused buffers): the same values, and the rows' gradient is
    the logits' gradient through the head. Two graphs alive at once keep their own buffers, and a step after them
    (the pool's buffers reused) gives the same numbers again."""
    from dinado.parameterizations import parameterization_for

    param = parameterization_for("dinado-soft", "soft")
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 16, generator=g)
    hidden = [torch.randn(9, 16, generator=g) for _ in range(2)]
    log_p = [torch.log_softmax(h @ weight.t() + 0.1 * torch.randn(9, 300, generator=g), -1) for h in hidden]
    following = torch.randint(0, 300, (9,), generator=g)
    upstream = [torch.randn(9, generator=g) for _ in range(3)]

    def reference(h, lp):
        logits = (h @ weight.t()).requires_grad_()
        outs = features._MergeStats.apply(logits, lp, following, param)
        sum(u @ o for u, o in zip(upstream, outs, strict=True)).backward()
        return [o.detach() for o in outs], logits.grad @ weight

    expected = [reference(h, lp) for h, lp in zip(hidden, log_p, strict=True)]
    for _ in range(2):  # the second round reads the buffers the first gave back
        rows = [h.clone().requires_grad_() for h in hidden]
        outs = [
            features._MergeStats.apply(r, lp, following, param, weight)
            for r, lp in zip(rows, log_p, strict=True)
        ]
        for r, o, (want, want_grad) in reversed(list(zip(rows, outs, expected, strict=True))):
            sum(u @ v for u, v in zip(upstream, o, strict=True)).backward()
            for got, value in zip(o, want, strict=True):
                assert torch.allclose(got, value, atol=1e-5)
            assert torch.allclose(r.grad, want_grad, atol=1e-5)


def test_merge_statistics_share_the_max_gradient_among_maxima_within_float_noise():
    # at initialisation the cached Merge path's direction is float noise around 0 (log p read from the cache, the
    # adapted model run on the top layers only): the max's gradient must be shared as if every token tied, not
    # given to whichever token's noise is largest
    from dinado.parameterizations import parameterization_for

    param = parameterization_for("dinado-soft", "soft")
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(4, 40, generator=g) * 2, dim=-1)
    following = torch.randint(0, 40, (4,), generator=g)
    upstream = torch.randn(4, generator=g)

    def max_gradient(logits):
        logits = logits.clone().requires_grad_()
        _, mx, _ = features._MergeStats.apply(logits, log_p, following, param)
        (upstream @ mx).backward()
        return logits.grad

    exact_ties = max_gradient(log_p)  # d = 0 exactly: every token ties, as torch.amax shares them
    noisy = max_gradient(log_p + 1e-5 * torch.randn(4, 40, generator=g))
    assert (noisy - exact_ties).abs().max() < 1e-4 * exact_ties.abs().max()
    clear = log_p.clone()
    clear[:, 7] += 1.0  # one token's direction clearly above the rest: it takes the whole gradient
    one_hot = torch.zeros(4, 40).index_fill_(1, torch.tensor([7]), 1.0)
    expected = upstream[:, None] * (one_hot - torch.softmax(clear, -1))  # through log_softmax
    assert (max_gradient(clear) - expected).abs().max() < 1e-5


# ------------------------------------------------------------------- caches recorded while sampling
PROMPTS = [[0, 5, 6], [0, 7], [0, 9, 10, 11, 12]]


def _length_oracle(prompts, completions):
    return [min(len(c) / 40, 1.0) for c in completions]


@pytest.mark.parametrize("kind, seed", [("gpt2", 14), ("llama", 4)])
def test_sampling_records_the_caches_a_second_pass_would_build(kind, seed):
    base = BASES[kind]()
    guides = [
        Guide.create(base, "dinado-merge", lora_r=4, lora_target_modules=TOP_LAYER, seed=0),
        Guide.create(base, "dinado-soft", seed=0),
    ]
    kwargs = dict(max_new_tokens=40, batch_size=3, seed=seed)
    samples, caches = dinado.sample_with_features(base, guides, PROMPTS, 2, _length_oracle, **kwargs)
    plain = dinado.sample(base, PROMPTS, 2, _length_oracle, **kwargs)
    assert samples.completions == plain.completions and samples.labels.equal(plain.labels)
    lengths = [len(c) for c in samples.completions]
    # rows that stop at EOS, rows cut at max_new_tokens, and (gpt2) a batch whose rows all stop early
    assert min(lengths) < 40 and max(lengths) == 40
    if kind == "gpt2":
        assert max(lengths[:3]) < 40
    passed = dinado.precompute_shared_features(guides, samples, batch_size=4)
    width = max(len(p) + len(c) for p, c in zip(samples.prompts, samples.completions, strict=True))
    rows = range(len(samples))
    for recorded, computed in zip(caches, passed, strict=True):
        assert recorded.metadata == computed.metadata and recorded.nbytes == computed.nbytes
        for last in (False, True) if recorded.metadata["last_hidden"] else (False,):
            a, b = recorded.batch_hidden(rows, width, last), computed.batch_hidden(rows, width, last)
            assert (a - b).abs().max() <= 1e-5 * (1 + b.abs().max())  # float rounding of other passes only
    assert caches[0].metadata["layer"] == 1 and caches[1].metadata["layer"] is None
    # training on either cache takes the same steps
    for guide in guides:
        losses = []
        for cache in caches[guides.index(guide)], passed[guides.index(guide)]:
            twin = copy.deepcopy(guide)
            report = dinado.train(twin, samples, max_steps=3, batch_size=4, seed=0, cache_features=cache)
            losses.append(report.loss)
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_sampling_with_features_refuses_other_bases_and_checks_what_it_recorded(monkeypatch):
    from dinado import sampling

    base = _tiny_llama()
    guide = Guide.create(base, "dinado-soft")
    with pytest.raises(FeatureCacheError, match="created on another base"):
        dinado.sample_with_features(_tiny_llama(seed=5), [guide], PROMPTS, 1, _length_oracle, 4)
    with pytest.raises(ValueError, match="decoder-only base itself"):
        dinado.sample(guide, PROMPTS, 1, _length_oracle, 4, record_states={None: []})
    with pytest.raises(ValueError, match="at least one guide"):
        dinado.sample_with_features(base, [], PROMPTS, 1, _length_oracle, 4)
    recorder = sampling._record_states

    def shifted(model, seen, out, *args):  # states one position off: what a misaligned recording would keep
        recorder(model, seen, out, *args)
        for rows in out.values():
            rows[-1] = rows[-1].roll(1, dims=0)

    monkeypatch.setattr(sampling, "_record_states", shifted)
    with pytest.raises(FeatureCacheError, match="differ from a full pass"):
        dinado.sample_with_features(base, [guide], PROMPTS[:1], 1, _length_oracle, 6, batch_size=1)
