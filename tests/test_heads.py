"""Guide heads (GuideConfig.head, read_tokens): each is exact where the full head is.

The tied head multiplies a vector in the base's hidden space by the base's own output embeddings; read_tokens
adds the base's input embedding of each token to what the module reads. Every option keeps q_theta = p at
initialisation, decodes as next_token_logprobs at every step, trains from cached features with the uncached
path's loss and gradients, survives save/load, and trains on the exact testbed.
"""

import json

import pytest
import torch
import torch.nn.functional as F

import dinado
from dinado import Guide, exact

from .conftest import CAUSAL_KINDS, randomize_guide, tiny_causal
from .test_decoding import PROMPTS, _check_steps, decoded_steps
from .test_features import BASES, _assert_close, _compare, _samples, float32_tolerance

MODULE_VARIANTS = ("nado", "dinado-soft", "dinado-hard")
OPTIONS = {
    "tied": {"head": "tied"},
    "tokens": {"read_tokens": True},
    "tied+tokens": {"head": "tied", "read_tokens": True},
    "full-rank3": {"head_rank": 3},
    "tied-rank3": {"head": "tied", "head_rank": 3},
}
# (the pointer is on by default for the module variants, so every option above runs with it)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("variant", MODULE_VARIANTS)
def test_q_equals_p_at_initialisation(variant, option, kind):
    base = tiny_causal(kind)
    ids = torch.tensor([[0, 5, 9, 0, 3, 7], [0, 0, 2, 8, 4, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    guide = Guide.create(base, variant, **OPTIONS[option])
    with torch.no_grad():
        out = guide(ids, mask)
        log_q = guide.next_token_logprobs(ids, mask)
    assert out.direction.abs().max() == 0
    assert (log_q - out.log_p)[mask.bool()].abs().max() < 1e-5


def test_the_tied_head_has_no_parameter_per_token():
    base = tiny_causal("gpt2")
    full = Guide.create(base, "dinado-soft", module_dim=16)
    tied = Guide.create(base, "dinado-soft", module_dim=16, head="tied")
    vocab, hidden = full.config.base_vocab_size, full.config.base_hidden_size
    count = lambda g: sum(p.numel() for p in g.trainable_state().values())  # noqa: E731
    assert count(full) - count(tied) == 16 * vocab + vocab - 16 * hidden
    assert not any(p.shape[0] == vocab for p in tied.trainable_state().values())


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("mode", ["greedy", "sampling", "beam3", "beam3-nocache"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_processor_equals_next_token_logprobs_at_every_step(option, mode, kind):
    guide = Guide.create(tiny_causal(kind, vocab_size=12), "dinado-soft", **OPTIONS[option])
    randomize_guide(guide)
    guide.eval()
    assert _check_steps(guide, decoded_steps(guide, mode), PROMPTS.shape[1]) < 1e-4
    # candidate-restricted guidance (tests/test_candidates.py): the fast path decodes q_k, which is not q_theta
    steps = decoded_steps(guide, mode, candidates=4)
    assert _check_steps(guide, steps, PROMPTS.shape[1], candidates=4) < 1e-4
    assert _check_steps(guide, steps, PROMPTS.shape[1]) > 1e-3


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("variant", MODULE_VARIANTS)
@pytest.mark.parametrize("kind", list(BASES))
def test_cached_features_give_the_loss_and_gradients_of_the_uncached_path(kind, variant, option):
    guide = Guide.create(BASES[kind](), variant, **OPTIONS[option])
    randomize_guide(guide)
    reference, uncached, cached = _compare(guide, _samples())
    assert max(g.abs().max().item() for g in reference[1]) > 1e-2
    tolerance = float32_tolerance(guide, _samples(), reference)
    _assert_close(uncached, reference, tolerance)
    _assert_close(cached, uncached, tolerance)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_save_load_round_trip(tmp_path, option, kind):
    guide = Guide.create(tiny_causal(kind), "nado", num_layers=1, **OPTIONS[option])
    randomize_guide(guide)
    guide.save_pretrained(tmp_path / "g")
    saved = json.loads((tmp_path / "g" / "dinado_config.json").read_text())
    assert {k: saved[k] for k in OPTIONS[option]} == OPTIONS[option]
    loaded = Guide.from_pretrained(tmp_path / "g", tiny_causal(kind))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        expected = guide.eval().next_token_logprobs(ids, mask)
        assert torch.equal(expected, loaded.eval().next_token_logprobs(ids, mask))
        assert (expected - F.log_softmax(guide(ids, mask).log_p, -1)).abs().max() > 1e-2


def test_an_unknown_head_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="head must be one of full, tied"):
        Guide.create(tiny_causal("gpt2"), "nado", head="pointer")


@pytest.mark.parametrize("rank", [0, -2, True, 2.5])
def test_a_bad_head_rank_is_refused(rank):
    with pytest.raises(ValueError, match="head_rank must be a positive integer"):
        Guide.create(tiny_causal("gpt2"), "nado", head_rank=rank)


def test_the_default_rank_is_decided_by_the_vocabulary_and_saved_as_a_number(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from dinado.config import AUTO_HEAD_RANK, AUTO_HEAD_RANK_VOCAB, GuideConfig

    small = Guide.create(tiny_causal("gpt2"), "dinado-soft")
    assert small.config.head_rank is None and small.module.head_down is None  # full rank below the threshold
    torch.manual_seed(0)
    large_base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=AUTO_HEAD_RANK_VOCAB))
    large = Guide.create(large_base, "dinado-soft", module_dim=AUTO_HEAD_RANK * 2)
    assert large.config.head_rank == AUTO_HEAD_RANK
    assert large.module.token_head.weight.shape == (AUTO_HEAD_RANK_VOCAB, AUTO_HEAD_RANK)
    assert Guide.create(large_base, "dinado-soft", head_rank=None).config.head_rank is None  # full rank asked
    assert Guide.create(large_base, "dinado-merge").config.head_rank is None  # no module head
    large.save_pretrained(tmp_path / "g")
    assert json.loads((tmp_path / "g" / "dinado_config.json").read_text())["head_rank"] == AUTO_HEAD_RANK
    # a config saved before head_rank existed meant full rank, whatever the vocabulary
    old = {k: v for k, v in large.config.to_dict().items() if k != "head_rank"}
    assert GuideConfig.from_dict(old).head_rank is None


@pytest.mark.parametrize("head", ["full", "tied"])
def test_a_low_rank_head_costs_rank_times_vocabulary(head):
    base = tiny_causal("gpt2")
    guide = Guide.create(base, "dinado-soft", module_dim=16, head=head, head_rank=3)
    weight, _ = guide.module.head_weights(base.get_output_embeddings().weight)
    assert weight.shape == (guide.config.base_vocab_size, 3)
    assert guide.module.head_input(torch.zeros(2, 5, 16)).shape == (2, 5, 3)
    assert not any(
        p.dim() == 2 and p.shape[0] == guide.config.base_vocab_size and p.shape[1] > 3
        for p in guide.trainable_state().values()
    )


def test_the_tied_low_rank_product_is_kept_while_nothing_changes_and_redone_after_a_step():
    base = tiny_causal("gpt2")
    guide = Guide.create(base, "dinado-soft", head="tied", head_rank=3)
    embeddings = base.get_output_embeddings().weight
    with torch.no_grad():
        first = guide.module.head_weights(embeddings)[0]
        assert guide.module.head_weights(embeddings)[0] is first
        guide.module.head_up.weight.add_(1.0)  # what an optimiser step does
        second = guide.module.head_weights(embeddings)[0]
    assert second is not first
    expected = embeddings @ guide.module.head_up.weight
    assert (second - expected).abs().max() < 1e-5
    assert (guide.module.head_weights(embeddings)[0] - expected).abs().max() < 1e-5  # with grad: fresh


@pytest.mark.parametrize(
    ("variant", "option"),
    [("dinado-soft", option) for option in OPTIONS]
    + [("nado", "tied+tokens"), ("dinado-hard", "tied+tokens")],
)
def test_training_on_the_exact_testbed_cuts_the_kl(variant, option, toy_base):
    torch.manual_seed(0)
    guide = Guide.create(toy_base, variant, **OPTIONS[option])
    args = (exact.TOY_PROMPT, exact.toy_oracle, 4, exact.TOY_EOS)
    start = exact.evaluate(guide, *args)
    samples = start.draw(4000, exact.TOY_PROMPT, seed=0)
    dinado.train(guide, samples, max_steps=400, batch_size=256, seed=0)
    end = exact.evaluate(guide, *args)
    assert end.kl_q_star_q < 0.5 * start.kl_q_star_p
    assert end.success_q > start.success_p + 0.1


@pytest.mark.parametrize(("flag", "value"), [("auto", "auto"), ("null", None), ("8", 8)])
def test_the_cli_takes_auto_null_or_a_rank(flag, value):
    from dinado.cli import build_parser, resolve

    args = build_parser().parse_args(
        ["train", "--head-rank", flag, "--samples", "s", "--base", "b", "--output", "o"]
    )
    assert resolve("train", args)["head_rank"] == value
