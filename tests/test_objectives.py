import torch

from dinado import Guide, SampleSet
from dinado.objectives import guide_loss

from .conftest import randomize_guide, tiny_gpt2


def test_masks_separate_prompt_completion_terminal_and_padding():
    # the prompt holds EOS (0), the first completion ends in EOS, the second stops at the cap, pad is 0 too
    s = SampleSet.from_token_ids([[0, 5], [0]], [[7, 0], [3, 4, 9, 2]], [1.0, 0.0])
    b = s.collate([0, 1])
    assert b.input_ids.tolist() == [[0, 5, 7, 0, 0], [0, 3, 4, 9, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert b.completion_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert b.terminal_mask.tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]


def test_loss_ignores_padding_and_counts_the_right_terms():
    guide = Guide.create(tiny_gpt2(), "nado")
    randomize_guide(guide)
    s = SampleSet.from_token_ids([[0, 5], [0]], [[7, 0], [3, 4, 9]], [1.0, 0.0])
    terms = guide_loss(guide, s.collate([0, 1]))
    assert terms.ce_count == 5  # 2 + 3 completion prefixes
    assert terms.reg_count == 3  # non-terminal transitions: 1 + 2
    # padding content must not matter: same loss with another pad id
    other = guide_loss(guide, s.collate([0, 1], pad_id=11))
    assert torch.allclose(terms.loss, other.loss, atol=1e-6)
    terminal = guide_loss(guide, s.collate([0, 1]), ce_positions="terminal")
    assert terminal.ce_count == 2


def test_each_sample_loss_is_independent_of_batch_companions():
    guide = Guide.create(tiny_gpt2(), "dinado-soft")
    randomize_guide(guide)
    s = SampleSet.from_token_ids([[0, 5], [0]], [[7, 0], [3, 4, 9, 2, 2, 8]], [1.0, 0.0])
    alone = guide_loss(guide, s.collate([0]))
    together = guide_loss(guide, s.collate([0, 0]))  # padding to the same length changes nothing
    assert torch.allclose(alone.loss, together.loss, atol=1e-6)


def test_importance_weights_are_self_normalised_per_prompt_group():
    s = SampleSet.from_token_ids(
        [[0], [0], [0, 1], [0, 1], [0, 1]], [[3]] * 5, [1.0] * 5, log_weights=[0.0, 2.0, 1.0, 1.0, -50.0]
    )
    w = s.normalized_weights()
    assert torch.allclose(w[:2].sum(), torch.tensor(2.0)) and torch.allclose(w[2:].sum(), torch.tensor(3.0))
    assert w[1] / w[0] > 7.0  # e^2
    assert torch.allclose(s.normalized_weights(clip=1.2)[1], torch.tensor(1.2))
    assert torch.equal(SampleSet.from_token_ids([[0]], [[3]], [1.0]).normalized_weights(), torch.ones(1))
