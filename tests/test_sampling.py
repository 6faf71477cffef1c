import copy

import pytest
import torch

import dinado
from dinado import Guide, exact

from .conftest import randomize_guide, tiny_gpt2, with_dropout


def _exact_table(guide):
    result = exact.evaluate(
        guide, exact.TOY_PROMPT, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, exact.TOY_EOS
    )
    return result, {tuple(c): i for i, c in enumerate(result.completions)}


def test_samples_from_the_base_record_exact_log_p_and_no_weights(toy_base):
    samples = dinado.sample(
        toy_base, [exact.TOY_PROMPT], 300, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, seed=1
    )
    result, index = _exact_table(Guide.create(toy_base, "nado"))
    assert samples.log_weights is None
    for comp, lp, label in zip(
        samples.completions, samples.token_log_p, samples.labels.tolist(), strict=True
    ):
        i = index[tuple(comp)]  # every sample is a terminal completion of the enumeration
        assert abs(sum(lp) - float(result.log_p[i])) < 1e-4
        assert label == float(result.labels[i])


def test_samples_from_a_guide_record_exact_proposal_log_probabilities_and_weights(toy_base):
    guide = Guide.create(toy_base, "dinado-soft")
    randomize_guide(guide, scale=0.5)
    samples = dinado.sample(
        guide, [exact.TOY_PROMPT], 300, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, seed=2
    )
    result, index = _exact_table(guide)
    assert samples.log_weights is not None
    errors = []
    for n, comp in enumerate(samples.completions):
        i = index[tuple(comp)]
        errors.append(abs(sum(samples.token_log_proposal[n]) - float(result.log_q[i])))
        errors.append(abs(float(samples.log_weights[n]) - float(result.log_p[i] - result.log_q[i])))
    assert max(errors) < 1e-4
    assert samples.log_weights.abs().max() > 0.1  # the proposal really differs from p


def test_tempered_sampling_records_the_tempered_distribution(toy_base):
    """Review 4(d): the recorded proposal log-probs are those of softmax(logits / T), log p those of softmax(logits),
    each checked per token against a teacher-forced pass computed here, not against each other."""
    temperature = 2.0
    prompts = [exact.TOY_PROMPT, [0, 3, 5]]  # of different lengths: the sampler left-pads them
    samples = dinado.sample(toy_base, prompts, 100, exact.toy_oracle, 6, temperature=temperature, seed=3)
    model = copy.deepcopy(toy_base).eval()
    tempered = lambda ids: torch.log_softmax(model(ids).logits.float() / temperature, -1)  # noqa: E731
    errors, gaps = [], []
    for prompt, comp, lp, lpi, log_w in zip(
        samples.prompts,
        samples.completions,
        samples.token_log_p,
        samples.token_log_proposal,
        samples.log_weights.tolist(),
        strict=True,
    ):
        ref_p = _teacher_forced(_lm_log_probs(model), prompt, comp)
        ref_pi = _teacher_forced(tempered, prompt, comp)
        assert len(lp) == len(lpi) == len(comp)
        errors += [abs(a - b) for a, b in zip(lpi + lp, ref_pi + ref_p, strict=True)]
        errors.append(abs(log_w - (sum(ref_p) - sum(ref_pi))))
        gaps += [abs(a - b) for a, b in zip(ref_p, ref_pi, strict=True)]
    assert len(errors) > 200 and max(errors) < 1e-4
    assert max(gaps) > 0.1  # at T = 2 the two distributions differ: a swapped record cannot pass


def test_sampling_is_reproducible_with_a_seed(toy_base):
    a = dinado.sample(toy_base, [[0], [0, 3]], 20, exact.toy_oracle, 5, seed=7)
    b = dinado.sample(toy_base, [[0], [0, 3]], 20, exact.toy_oracle, 5, seed=7)
    c = dinado.sample(toy_base, [[0], [0, 3]], 20, exact.toy_oracle, 5, seed=8)
    assert a.completions == b.completions and a.completions != c.completions


def test_processors_from_the_generation_config_are_weighted_too(toy_base):
    toy_base.generation_config.repetition_penalty = 3.0  # no longer samples from p, though T=1 and top_p=1
    samples = dinado.sample(toy_base, [exact.TOY_PROMPT], 200, exact.toy_oracle, 6, seed=4)
    assert samples.log_weights is not None and samples.log_weights.abs().max() > 0.1


def test_samples_from_another_model_as_proposal_are_weighted_by_exact_p_over_pi(toy_base):
    other = exact.toy_base(11, init_scale=0.3)  # same vocabulary, different distribution
    samples = dinado.sample(
        toy_base, [[0], [0, 3]], 100, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, seed=4, proposal=other
    )
    errors = []
    for prompt in ([0], [0, 3]):
        p_table = exact.evaluate(
            Guide.create(toy_base, "nado"), prompt, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, exact.TOY_EOS
        )
        pi_table = exact.evaluate(
            Guide.create(other, "nado"), prompt, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, exact.TOY_EOS
        )
        index = {tuple(c): i for i, c in enumerate(p_table.completions)}
        for n, comp in enumerate(samples.completions):
            if samples.prompts[n] != prompt:
                continue
            i = index[tuple(comp)]
            errors.append(abs(sum(samples.token_log_p[n]) - float(p_table.log_p[i])))
            errors.append(abs(sum(samples.token_log_proposal[n]) - float(pi_table.log_p[i])))
            target = float(p_table.log_p[i] - pi_table.log_p[i])
            errors.append(abs(float(samples.log_weights[n]) - target))
    assert len(errors) == 3 * 200 and max(errors) < 1e-4
    assert samples.log_weights.abs().max() > 0.1
    assert samples.metadata["sampling"]["proposal"].startswith("model:")
    with pytest.raises(ValueError, match="either a Guide as source or proposal="):
        dinado.sample(Guide.create(toy_base, "nado"), [[0]], 2, exact.toy_oracle, 3, proposal=other)
    with pytest.raises(ValueError, match="vocabulary .* differs"):
        dinado.sample(toy_base, [[0]], 2, exact.toy_oracle, 3, proposal=exact.toy_base(1, vocab_size=9))


def _teacher_forced(log_probs, prompt, completion):
    """Per-token log-probabilities of ``completion`` after ``prompt`` from ``log_probs(ids) -> [1, L, V]``."""
    with torch.no_grad():
        lp = log_probs(torch.tensor([prompt + completion]))[0]
    return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion)]


def _lm_log_probs(model):
    return lambda ids: torch.log_softmax(model(ids, attention_mask=torch.ones_like(ids)).logits.float(), -1)


def _dropout_flags(model):
    return [m.training for m in model.modules() if isinstance(m, torch.nn.Dropout)]


@pytest.mark.parametrize("with_proposal", [False, True])
def test_sampling_runs_models_in_eval_mode_and_restores_their_modes(with_proposal):
    base = with_dropout(tiny_gpt2(seed=3))  # a freshly built model is in training mode
    base.transformer.h[0].eval()  # mixed modes come back exactly as they were
    proposal = with_dropout(tiny_gpt2(seed=4)) if with_proposal else None
    flags = [_dropout_flags(m) for m in (base, proposal) if m is not None]
    ref_base = _lm_log_probs(copy.deepcopy(base).eval())
    ref_proposal = _lm_log_probs(copy.deepcopy(proposal).eval()) if with_proposal else ref_base
    samples = dinado.sample(base, [[0], [0, 3, 5]], 4, exact.toy_oracle, 6, seed=5, proposal=proposal)
    errors = []
    for prompt, comp, lp, lpi in zip(
        samples.prompts, samples.completions, samples.token_log_p, samples.token_log_proposal, strict=True
    ):
        errors += [abs(a - b) for a, b in zip(lp, _teacher_forced(ref_base, prompt, comp), strict=True)]
        errors += [abs(a - b) for a, b in zip(lpi, _teacher_forced(ref_proposal, prompt, comp), strict=True)]
    assert len(errors) > 20 and max(errors) < 1e-5
    assert base.training and not base.transformer.h[0].training and base.transformer.h[1].training
    assert [_dropout_flags(m) for m in (base, proposal) if m is not None] == flags


@pytest.mark.parametrize("variant", ["dinado-soft", "dinado-merge"])
def test_sampling_from_a_guide_in_training_mode_records_its_eval_mode_distributions(variant):
    guide = Guide.create(tiny_gpt2(seed=3), variant, lora_dropout=0.5)
    randomize_guide(guide, scale=0.5)
    with_dropout(guide)  # dropout in its own module too; Guide.train keeps the base in eval
    inner = guide.module.body.h[0] if guide.module is not None else guide.norm_head
    inner.eval()
    modes = [m.training for m in guide.modules()]
    reference = copy.deepcopy(guide).eval()
    samples = dinado.sample(guide, [[0], [0, 3, 5]], 4, exact.toy_oracle, 6, seed=6)
    errors = []
    for prompt, comp, lp, lq in zip(
        samples.prompts, samples.completions, samples.token_log_p, samples.token_log_proposal, strict=True
    ):
        ref_p = _teacher_forced(lambda ids: reference(ids).log_p, prompt, comp)
        ref_q = _teacher_forced(reference.next_token_logprobs, prompt, comp)
        errors += [abs(a - b) for a, b in zip(lp + lq, ref_p + ref_q, strict=True)]
    assert len(errors) > 20 and max(errors) < 1e-5
    assert [m.training for m in guide.modules()] == modes and guide.training and not inner.training


def test_relabel_keeps_the_samples_and_replaces_the_labels_without_touching_the_input(toy_base):
    samples = dinado.sample(
        toy_base, [exact.TOY_PROMPT], 40, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, seed=5
    )
    before = (samples.labels.clone(), [list(c) for c in samples.completions], dict(samples.metadata))

    def length_share(prompts, completions):  # a soft oracle: the completion's share of the longest
        return [len(c) / exact.TOY_MAX_NEW_TOKENS for c in completions]

    relabelled = dinado.relabel(samples, length_share, batch_size=7)  # batches that do not divide 40
    assert relabelled.labels.tolist() == pytest.approx(
        [len(c) / exact.TOY_MAX_NEW_TOKENS for c in samples.completions]
    )
    assert relabelled.completions == samples.completions and relabelled.prompts == samples.prompts
    assert relabelled.token_log_p == samples.token_log_p
    assert "length_share" in relabelled.metadata["oracle"]
    assert torch.equal(samples.labels, before[0])  # the caller's set is unchanged
    assert samples.completions == before[1] and samples.metadata == before[2]


@pytest.mark.parametrize(
    "labels, message", [([0.5] * 3, "got 3 labels for 4"), ([0.2, 1.5, 0, 0], "label 1 is 1.5")]
)
def test_with_labels_refuses_a_wrong_count_or_a_value_outside_0_1(labels, message):
    samples = dinado.SampleSet.from_token_ids([[1]] * 4, [[2], [3], [4], [5]], [0, 1, 0, 1])
    with pytest.raises(ValueError, match=message):
        samples.with_labels(labels)
    assert samples.with_labels([0.25] * 4).labels.tolist() == [0.25] * 4


def test_concat_joins_parts_in_order_fills_missing_weights_and_leaves_the_parts_alone(toy_base):
    from_p = dinado.sample(
        toy_base, [exact.TOY_PROMPT], 6, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, seed=5
    )
    weighted = dinado.SampleSet.from_token_ids(
        [[0]] * 3, [[2], [3, 4], [5]], [1, 0, 1], log_weights=[0.5, -1.0, 2.0], metadata={"oracle": "other"}
    )
    before = [
        (s.labels.clone(), [list(c) for c in s.completions], dict(s.metadata)) for s in (from_p, weighted)
    ]
    joined = dinado.SampleSet.concat([from_p, weighted])
    assert len(joined) == 9
    assert joined.prompts == from_p.prompts + weighted.prompts
    assert joined.completions == from_p.completions + weighted.completions
    assert joined.labels.tolist() == from_p.labels.tolist() + [1.0, 0.0, 1.0]
    # samples from p carry log weight 0 beside the weighted part; its weights are kept as they were
    assert joined.log_weights.tolist() == [0.0] * 6 + [0.5, -1.0, 2.0]
    assert joined.token_log_p is None  # the second part recorded none
    assert joined.metadata["base_fingerprint"] == from_p.metadata["base_fingerprint"]
    assert [p["samples"] for p in joined.metadata["parts"]] == [6, 3]
    assert joined.metadata["parts"][0]["proposal"] == from_p.metadata["sampling"]["proposal"]
    for s, (labels, completions, metadata) in zip((from_p, weighted), before, strict=True):
        assert torch.equal(s.labels, labels) and s.completions == completions and s.metadata == metadata
    joined.completions[0].append(99)  # the joined set owns its rows
    assert from_p.completions == before[0][1]
    alone = dinado.SampleSet.concat([from_p, from_p])
    assert alone.log_weights is None and alone.token_log_p == from_p.token_log_p + from_p.token_log_p


def test_concat_refuses_parts_from_different_bases_and_empty_input():
    a = dinado.SampleSet.from_token_ids([[0]], [[1]], [1], metadata={"base_fingerprint": "aaa"})
    b = dinado.SampleSet.from_token_ids([[0]], [[1]], [1], metadata={"base_fingerprint": "bbb"})
    with pytest.raises(ValueError, match="differ in base_fingerprint"):
        dinado.SampleSet.concat([a, b])
    with pytest.raises(ValueError, match="at least one"):
        dinado.SampleSet.concat([])
    with pytest.raises(TypeError, match="parts\\[1\\] is a list"):
        dinado.SampleSet.concat([a, [1]])


def _chi_square(counts: dict, probabilities: dict, total: int) -> tuple[float, int]:
    """Pearson's statistic over the outcomes expected at least 5 times (the rest pooled) and its degrees of
    freedom."""
    big = [k for k, p in probabilities.items() if p * total >= 5]
    rest_p = 1.0 - sum(probabilities[k] for k in big)
    rest_n = total - sum(counts.get(k, 0) for k in big)
    stat = sum((counts.get(k, 0) - probabilities[k] * total) ** 2 / (probabilities[k] * total) for k in big)
    cells = len(big)
    if rest_p * total >= 5:
        stat += (rest_n - rest_p * total) ** 2 / (rest_p * total)
        cells += 1
    return stat, cells - 1


@pytest.mark.parametrize("source", ["base", "guide"])
def test_sampled_completions_follow_the_exact_distribution(toy_base, source):
    """The whole-sequence frequencies of dinado.sample match the enumerated p (or the guide's q): the token
    draw (inverse-CDF lookup under greedy search) samples the distribution it records."""
    from collections import Counter

    model = toy_base
    if source == "guide":
        model = Guide.create(toy_base, "dinado-soft")
        randomize_guide(model, scale=0.5)
    total = 4000
    samples = dinado.sample(
        model, [exact.TOY_PROMPT], total, exact.toy_oracle, exact.TOY_MAX_NEW_TOKENS, batch_size=1000, seed=3
    )
    result, _ = _exact_table(model if source == "guide" else Guide.create(toy_base, "nado"))
    log_probs = result.log_q if source == "guide" else result.log_p
    probabilities = {tuple(c): float(lp.exp()) for c, lp in zip(result.completions, log_probs, strict=True)}
    stat, df = _chi_square(Counter(tuple(c) for c in samples.completions), probabilities, total)
    assert df >= 10
    assert stat < df + 6 * (2 * df) ** 0.5  # a 6-sigma bound: a biased sampler lands far above


def test_the_token_draw_follows_the_scores_and_never_takes_an_impossible_token():
    from dinado.sampling import InverseCdfSampler

    torch.manual_seed(0)
    scores = torch.tensor([[2.0, float("-inf"), 0.0, 1.0, float("-inf"), -1.0]]).repeat(20000, 1)
    out = InverseCdfSampler()(None, scores)
    assert out.isfinite().sum(-1).eq(1).all()  # exactly one token left per row
    counts = torch.bincount(out.argmax(-1), minlength=6).double()
    assert counts[1] == 0 and counts[4] == 0
    expected = torch.softmax(scores[0].double(), -1) * len(scores)
    kept = expected > 0
    stat = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum()
    assert stat < 3 + 6 * 6**0.5  # 3 degrees of freedom
