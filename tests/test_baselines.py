"""dinado.baselines: LoRA and prompt-tuning fine-tuning, best-of-n rejection sampling, bad input."""

import copy

import pytest
import torch
from transformers import GPT2LMHeadModel

from dinado.baselines import SoftPromptLM, _training_rows, best_of_n, supervised_finetune
from dinado.pretrain import build_tokenizer

from .conftest import tiny_gpt2, with_dropout

PAIRS = [
    ("cat sun =", "The cat sits in the sun."),
    ("dog ball =", "A dog chases the ball."),
    ("bird tree =", "A bird sings in a tree."),
    ("fish lake =", "The fish swims in the lake."),
    ("boy kite =", "A boy flies a kite."),
]
PROMPTS = [p for p, _ in PAIRS] * 4
TARGETS = [t for _, t in PAIRS] * 4


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer([f"{p} {t}" for p, t in PAIRS] * 3, vocab_size=300)


@pytest.fixture
def base(tok):
    return tiny_gpt2(seed=0, vocab_size=len(tok))


def encode(tok, prompts):
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


def left_pad(rows, pad=0):
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def greedy_texts(model, tok, prompts, max_new_tokens=12):
    ids, mask = left_pad(encode(tok, prompts))
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
    assert torch.equal(out[:, : ids.shape[1]], ids)  # the prompt ids come first, as for a plain model
    texts = []
    for new in out[:, ids.shape[1] :].tolist():
        new = new[: new.index(0)] if 0 in new else new
        texts.append(tok.decode(new, skip_special_tokens=True).strip())
    return texts


def target_loss(model, tok):
    """Mean cross-entropy of the target tokens and EOS given the prompts (right-padded, eval mode)."""
    rows, labels = [], []
    for p, t in PAIRS:
        prompt, target = encode(tok, [p])[0], tok(" " + t, add_special_tokens=False)["input_ids"] + [0]
        rows.append(prompt + target)
        labels.append([-100] * len(prompt) + target)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(out[:, :-1].transpose(1, 2), labels[:, 1:]).item()


def logits(model, tok):
    ids, mask = left_pad(encode(tok, PROMPTS[:5]))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---------------------------------------------------------------------------------------------------------
# supervised_finetune


def test_lora_learns_targets_and_leaves_base_untouched(base, tok):
    before = logits(base, tok)
    before_state = {k: v.clone() for k, v in base.state_dict().items()}
    distinct = [p for p, _ in PAIRS]
    base_hits = sum(g == t for g, (_, t) in zip(greedy_texts(base, tok, distinct), PAIRS, strict=True))

    model, info = supervised_finetune(
        base, tok, PROMPTS, TARGETS, method="lora", max_steps=200, batch_size=10, learning_rate=1e-2
    )
    assert type(model) is GPT2LMHeadModel and not model.training  # merged back into a plain model
    assert info["method"] == "lora" and info["steps"] == 200 and info["examples"] == 20
    assert info["truncated"] == 0 and info["wall_seconds"] > 0
    assert 0 < info["trainable_parameters"] < sum(p.numel() for p in base.parameters())
    assert info["train_loss_last"] < 0.3 * info["train_loss_first"]
    assert target_loss(model, tok) < 0.3 * target_loss(base, tok)
    tuned_hits = sum(g == t for g, (_, t) in zip(greedy_texts(model, tok, distinct), PAIRS, strict=True))
    assert tuned_hits >= 4 > base_hits

    # the caller's model is exactly as it was
    assert torch.allclose(logits(base, tok), before, atol=1e-6, rtol=0)
    assert all(torch.equal(v, before_state[k]) for k, v in base.state_dict().items())
    assert not any("lora" in name for name, _ in base.named_modules())
    assert not torch.allclose(logits(model, tok), before, atol=1e-3)


def test_prompt_tuning_lowers_loss_and_keeps_base(base, tok):
    before = logits(base, tok)
    model, info = supervised_finetune(
        base, tok, PROMPTS, TARGETS, method="prompt", max_steps=100, batch_size=10, learning_rate=0.1
    )
    assert isinstance(model, SoftPromptLM) and not model.training
    assert info["method"] == "prompt" and info["steps"] == 100
    assert info["trainable_parameters"] == 8 * base.config.n_embd  # 8 virtual tokens by default
    # a soft prompt cannot teach a random model much, but it clearly lowers the loss
    assert info["train_loss_last"] < info["train_loss_first"] - 1.0
    assert target_loss(model, tok) < target_loss(base, tok) - 1.0
    assert torch.allclose(logits(base, tok), before, atol=1e-6, rtol=0)
    assert all(p.requires_grad for p in base.parameters())  # not frozen by PEFT either
    # the frozen copy inside carries the base weights unchanged
    inner = model.base.state_dict()
    assert all(torch.equal(inner[k], v) for k, v in base.state_dict().items())
    assert not torch.allclose(logits(model, tok), before, atol=1e-3)


@pytest.fixture(scope="module")
def soft_prompt_model(tok):
    base = tiny_gpt2(seed=0, vocab_size=len(tok))
    model, _ = supervised_finetune(base, tok, PROMPTS, TARGETS, method="prompt", max_steps=5, batch_size=10)
    return model


@pytest.mark.parametrize("kwargs", [{"do_sample": False}, {"do_sample": False, "num_beams": 4}])
def test_soft_prompt_generate_with_left_padding(soft_prompt_model, tok, kwargs):
    """A left-padded batch gives each row what it gets alone; the new tokens follow the prompt ids."""
    model = soft_prompt_model
    prompts = ["cat sun =", "bird", "dog ball = A dog"]  # different lengths
    rows = encode(tok, prompts)
    assert len({len(r) for r in rows}) == 3
    ids, mask = left_pad(rows)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, **kwargs)
    assert out.shape == (3, ids.shape[1] + 6) and torch.equal(out[:, : ids.shape[1]], ids)
    for r, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), max_new_tokens=6, pad_token_id=0, **kwargs)
        assert alone[0, : len(row)].tolist() == row
        assert out[r, ids.shape[1] :].tolist() == alone[0, len(row) :].tolist()
    if not kwargs.get("num_beams"):
        # the first new token is the argmax of forward()'s logits at the last prompt position
        with torch.no_grad():
            last = model(input_ids=ids, attention_mask=mask).logits[:, -1]
        assert torch.equal(out[:, ids.shape[1]], last.argmax(-1))


def test_soft_prompt_matches_peft_forward_and_returns_dict(soft_prompt_model, tok):
    model = soft_prompt_model
    row = torch.tensor(encode(tok, ["cat sun ="]))
    with torch.no_grad():
        ours = model(input_ids=row).logits
        peft = model.peft_model(input_ids=row, attention_mask=torch.ones_like(row)).logits
    assert peft.shape[1] == row.shape[1] + model.num_virtual_tokens
    assert torch.allclose(ours, peft[:, model.num_virtual_tokens :], atol=1e-5)
    out = model.generate(
        input_ids=row.repeat(2, 1),
        max_new_tokens=4,
        do_sample=True,
        top_k=0,
        num_return_sequences=3,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
    )
    assert out.sequences.shape == (6, row.shape[1] + 4) and len(out.scores) == 4
    assert torch.equal(out.sequences[:, : row.shape[1]], row.repeat(6, 1))
    with pytest.raises(ValueError, match="positions left after"):
        model.generate(input_ids=row, max_new_tokens=64, pad_token_id=0)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_finetune_is_seeded(tok, method):
    def run(seed):
        base = tiny_gpt2(seed=0, vocab_size=len(tok))
        model, info = supervised_finetune(
            base, tok, PROMPTS, TARGETS, method=method, max_steps=8, batch_size=6, seed=seed
        )
        return model.state_dict(), info["train_loss_last"]

    (a, loss_a), (b, loss_b), (c, loss_c) = run(0), run(0), run(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and loss_a == loss_b
    assert loss_a != loss_c and any(not torch.equal(a[k], c[k]) for k in a)


def test_long_rows_are_truncated_and_counted(base, tok):
    long_target = " ".join(["the cat sits in the sun"] * 20)  # far more than 64 tokens
    prompts, targets = [*PROMPTS[:4], "cat sun ="], [*TARGETS[:4], long_target]
    assert len(tok(" " + long_target)["input_ids"]) > 64
    for method, kwargs in (("lora", {}), ("prompt", {"num_virtual_tokens": 8})):
        model, info = supervised_finetune(
            base, tok, prompts, targets, method=method, max_steps=2, batch_size=5, **kwargs
        )
        assert info["truncated"] == 1 and info["examples"] == 5 and info["steps"] == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "adapter"}, r"unknown method 'adapter': choose one of 'lora', 'prompt'"),
        ({"targets": TARGETS[:3]}, "same length, got 20 and 3"),
        ({"prompts": [], "targets": []}, "no training data"),
        ({"max_steps": 0}, "max_steps must be at least 1, got 0"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"method": "prompt", "num_virtual_tokens": 0}, "num_virtual_tokens must be at least 1"),
        ({"method": "prompt", "num_virtual_tokens": 63}, "leaves no room"),
    ],
)
def test_finetune_bad_input(base, tok, kwargs, message):
    args = {"prompts": PROMPTS, "targets": TARGETS, **kwargs}
    with pytest.raises(ValueError, match=message):
        supervised_finetune(base, tok, **args)


def test_training_rows_mask_prompt_and_padding(tok):
    ids, mask, labels, truncated = _training_rows(
        tok, ["cat sun =", "dog"], ["The cat.", "A dog chases"], None
    )
    prompt, target = encode(tok, ["cat sun ="])[0], tok(" The cat.", add_special_tokens=False)["input_ids"]
    n = len(prompt) + len(target) + 1
    assert ids[0, :n].tolist() == prompt + target + [0] and mask[0].tolist() == [1] * n + [0] * (
        ids.shape[1] - n
    )
    assert labels[0].tolist() == [-100] * len(prompt) + target + [0] + [-100] * (ids.shape[1] - n)
    assert tok.decode(ids[0, :n]) == "cat sun = The cat.<|endoftext|>"
    assert truncated == 0 and ids.shape[1] == max(n, int(mask[1].sum()))
    ids, mask, labels, truncated = _training_rows(tok, ["cat sun ="], ["The cat sits in the sun."], 6)
    assert ids.shape == (1, 6) and truncated == 1 and labels[0, len(prompt) :].ne(-100).all()


# ---------------------------------------------------------------------------------------------------------
# best_of_n


def test_best_of_n_picks_first_highest_score(base, tok):
    prompts = ["cat sun =", "dog ball =", "bird tree ="]
    seen = {}

    def score(ps, cs):
        seen["prompts"], seen["completions"] = list(ps), list(cs)
        return [float(len(c) % 3 == 0) + (len(c) % 3) / 4 for c in cs]  # many ties, some >= 1.0

    chosen, info = best_of_n(base, tok, prompts, n=5, score=score, max_new_tokens=8, batch_size=4, seed=3)
    assert seen["prompts"] == [p for p in prompts for _ in range(5)]
    completions = seen["completions"]
    assert len(completions) == 15 and len(set(completions)) > 3
    scores = score(seen["prompts"], completions)
    expected = []
    for i in range(3):
        group = scores[5 * i : 5 * i + 5]
        expected.append(completions[5 * i + group.index(max(group))])
    assert chosen == expected
    assert info["oracle_calls"] == 15
    assert info["accepted"] == pytest.approx(sum(max(scores[5 * i : 5 * i + 5]) >= 1.0 for i in range(3)) / 3)
    # completions are new text only: no prompt, no EOS marker, stripped
    assert all("<|endoftext|>" not in c and c == c.strip() for c in completions)


def test_best_of_n_with_substring_oracle_and_reproducible(base, tok):
    prompts = ["cat sun =", "fish lake =", "dog ball ="]
    drawn = []

    def has_the(ps, cs):
        drawn.append(list(cs))
        return [1.0 if "the" in c else 0.0 for c in cs]

    chosen, info = best_of_n(base, tok, prompts, n=8, score=has_the, max_new_tokens=10, seed=0)
    for i, c in enumerate(chosen):
        group = drawn[0][8 * i : 8 * i + 8]
        assert c in group and ("the" in c) == any("the" in g for g in group)
    assert 0 < info["accepted"] == sum("the" in c for c in chosen) / len(prompts)
    again, _ = best_of_n(base, tok, prompts, n=8, score=has_the, max_new_tokens=10, seed=0)
    assert again == chosen and drawn[1] == drawn[0]
    best_of_n(base, tok, prompts, n=8, score=has_the, max_new_tokens=10, seed=1)
    assert drawn[2] != drawn[0]


def test_best_of_n_with_n_1_is_plain_sampling(base, tok):
    prompts = ["cat sun =", "dog ball = A", "bird"]
    chosen, info = best_of_n(
        base, tok, prompts, n=1, score=lambda p, c: [0.0] * len(c), max_new_tokens=8, seed=7, temperature=0.8
    )
    assert info["oracle_calls"] == 3 and info["accepted"] == 0.0
    torch.manual_seed(7)
    ids, mask = left_pad(encode(tok, prompts))
    out = base.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        top_k=0,
        temperature=0.8,
        max_new_tokens=8,
        pad_token_id=0,
    )
    expected = []
    for new in out[:, ids.shape[1] :].tolist():
        new = new[: new.index(0)] if 0 in new else new
        expected.append(tok.decode(new).strip())
    assert chosen == expected


class ScriptedLM(torch.nn.Module):
    """Stands in for a model: generate() appends the same scripted tokens to every row."""

    def __init__(self, new_tokens):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.new_tokens = torch.tensor(new_tokens)
        self.calls = []

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append((input_ids, attention_mask, kwargs))
        return torch.cat([input_ids, self.new_tokens.expand(input_ids.shape[0], -1)], 1)


def test_best_of_n_cuts_at_eos_and_left_pads(tok):
    the, cat = (tok(w, add_special_tokens=False)["input_ids"] for w in (" the", " cat"))
    model = ScriptedLM([*the, 0, *cat, *cat])  # text after the first EOS must be dropped
    chosen, info = best_of_n(
        model,
        tok,
        ["cat sun =", "dog"],
        n=2,
        score=lambda p, c: [1.0] * len(c),
        max_new_tokens=4,
        batch_size=3,
    )
    assert chosen == ["the", "the"] and info["accepted"] == 1.0
    (ids, mask, kwargs), (ids2, mask2, _) = model.calls
    rows = encode(tok, ["cat sun =", "cat sun =", "dog"])
    assert torch.equal(ids, left_pad(rows)[0]) and torch.equal(mask, left_pad(rows)[1])
    assert ids2.tolist() == encode(tok, ["dog"]) and mask2.tolist() == [[1] * len(rows[2])]
    assert kwargs["do_sample"] and kwargs["top_k"] == 0 and kwargs["pad_token_id"] == 0


def test_best_of_n_with_soft_prompt_model(soft_prompt_model, tok):
    chosen, info = best_of_n(
        soft_prompt_model, tok, ["cat sun =", "dog"], n=3, score=lambda p, c: [1.0] * len(c), max_new_tokens=5
    )
    assert len(chosen) == 2 and info["accepted"] == 1.0 and info["oracle_calls"] == 6
    assert not any(c.startswith("cat sun =") for c in chosen)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be an integer of at least 1, got 0"),
        ({"n": 2.5}, "n must be an integer"),
        ({"max_new_tokens": 0}, "max_new_tokens must be"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"prompts": []}, "no prompts"),
        ({"score": lambda p, c: [1.0]}, "score returned 1 values for 4 completions"),
        ({"score": lambda p, c: [float("nan")] * len(c)}, "NaN"),
    ],
)
def test_best_of_n_bad_input(base, tok, kwargs, message):
    args = {
        "prompts": ["cat sun =", "dog"],
        "n": 2,
        "score": lambda p, c: [0.0] * len(c),
        "max_new_tokens": 4,
    }
    with pytest.raises(ValueError, match=message):
        best_of_n(base, tok, **{**args, **kwargs})


def test_best_of_n_samples_in_eval_mode_and_restores_every_submodule_mode(tok):
    model = with_dropout(tiny_gpt2(seed=0, vocab_size=len(tok)))
    model.transformer.h[0].eval()
    modes = [m.training for m in model.modules()]
    reference = copy.deepcopy(model).eval()
    prompts = ["cat sun =", "dog ball ="]
    drawn = []

    def score(ps, cs):
        drawn.append(list(cs))
        return [0.0] * len(cs)

    best_of_n(model, tok, prompts, n=4, score=score, max_new_tokens=8, seed=2)
    best_of_n(reference, tok, prompts, n=4, score=score, max_new_tokens=8, seed=2)
    assert drawn[0] == drawn[1]
    assert [m.training for m in model.modules()] == modes and model.training
