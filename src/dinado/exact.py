"""Exhaustive ground truth on a tiny model (method.md §6).

Every completion up to a length cap is enumerated, so R*, q* = p C / R*(c), KL(q* || q_theta) and the
success probability under q_theta are exact sums, not estimates.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from .data import SampleSet
from .guide import Guide
from .hf import eval_mode
from .oracles import TokenOracle, call_oracle


def enumerate_completions(vocab_size: int, max_new_tokens: int, eos_token_id: int) -> list[list[int]]:
    """All terminal completions: ending in EOS within the cap, or reaching the cap without EOS."""
    others = [v for v in range(vocab_size) if v != eos_token_id]
    out: list[list[int]] = []
    for k in range(max_new_tokens):
        out.extend(list(t) + [eos_token_id] for t in itertools.product(others, repeat=k))
    out.extend(list(t) for t in itertools.product(others, repeat=max_new_tokens))
    return out


@dataclass
class ExactResult:
    """Exact quantities for one prompt over all completions."""

    completions: list[list[int]]
    labels: torch.Tensor  # [N] C(x)
    log_p: torch.Tensor  # [N] log p(x | c), float64
    log_q: torch.Tensor  # [N] log q_theta(x | c), float64 (equals log_p for the base alone)

    def __repr__(self) -> str:
        """The scalar results only: the completions and per-completion tensors run to thousands of rows."""
        return (
            f"ExactResult(completions={len(self.completions)}, kl_q_star_q={self.kl_q_star_q:.6g}, "
            f"kl_q_star_p={self.kl_q_star_p:.6g}, success_q={self.success_q:.6g}, "
            f"success_p={self.success_p:.6g})"
        )

    @property
    def log_root_value(self) -> float:
        """log R*(c) = log sum_x p(x) C(x)."""
        return float(torch.logsumexp(self.log_p + self.labels.log(), 0))

    @property
    def success_p(self) -> float:
        return float((self.log_p.exp() * self.labels).sum())

    @property
    def success_q(self) -> float:
        """Success probability under q_theta: sum_x q_theta(x) C(x)."""
        return float((self.log_q.exp() * self.labels).sum())

    @property
    def log_q_star(self) -> torch.Tensor:
        return self.log_p + self.labels.log() - self.log_root_value

    def kl_q_star(self, log_other: torch.Tensor) -> float:
        """KL(q* || other) over the enumerated completions."""
        support = self.labels > 0
        lq = self.log_q_star[support]
        return float((lq.exp() * (lq - log_other[support])).sum())

    @property
    def kl_q_star_p(self) -> float:
        return self.kl_q_star(self.log_p)

    @property
    def kl_q_star_q(self) -> float:
        return self.kl_q_star(self.log_q)

    @property
    def mass_p(self) -> float:
        """Total probability of the enumerated completions under p (1 up to rounding: a self-check)."""
        return float(self.log_p.exp().sum())

    def draw(self, num_samples: int, prompt: Sequence[int], seed: int = 0, from_q: bool = False) -> SampleSet:
        """Exact i.i.d. samples from p (or from q_theta, then with log weights log p - log q_theta).

        Equivalent in distribution to ancestral sampling, and far faster on the testbed.
        """
        source = self.log_q if from_q else self.log_p
        generator = torch.Generator().manual_seed(seed)
        idx = torch.multinomial(source.exp(), num_samples, replacement=True, generator=generator)
        completions = [self.completions[i] for i in idx.tolist()]
        log_weights = (self.log_p - self.log_q)[idx].tolist() if from_q else None
        return SampleSet.from_token_ids(
            [list(prompt)] * num_samples,
            completions,
            self.labels[idx].tolist(),
            log_weights,
            {"sampling": {"proposal": "exact q_theta" if from_q else "exact p", "seed": seed}},
        )

    def prefix_values(self) -> dict[tuple[int, ...], float]:
        """R*(c, prefix) for every proper prefix of the completions, keyed by the prefix tokens."""
        num: dict[tuple[int, ...], float] = {}
        den: dict[tuple[int, ...], float] = {}
        pc = (self.log_p.exp() * self.labels).tolist()
        p = self.log_p.exp().tolist()
        for x, a, b in zip(self.completions, pc, p, strict=True):
            for k in range(len(x)):
                key = tuple(x[:k])
                num[key] = num.get(key, 0.0) + a
                den[key] = den.get(key, 0.0) + b
        return {k: num[k] / den[k] for k in num}


@torch.no_grad()
def sequence_logprobs(
    guide: Guide,
    prompt: Sequence[int],
    completions: list[list[int]],
    batch_size: int = 4096,
    candidates: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x | c), log q_theta(x | c)) for each completion, summed over its tokens, in float64
    (``candidates=k``: log q_k, what decoding with candidate-restricted guidance samples from)."""
    p_len = len(prompt)
    length = p_len + max(len(c) for c in completions)
    out_p, out_q = [], []
    with eval_mode(guide):  # the guide's values as it decodes: no dropout
        for start in range(0, len(completions), batch_size):
            chunk = completions[start : start + batch_size]
            ids = torch.zeros((len(chunk), length), dtype=torch.long)
            mask = torch.zeros_like(ids)
            comp = torch.zeros_like(ids, dtype=torch.float64)
            for r, c in enumerate(chunk):
                ids[r, : p_len + len(c)] = torch.tensor(list(prompt) + c)
                mask[r, : p_len + len(c)] = 1
                comp[r, p_len : p_len + len(c)] = 1
            ids, mask = ids.to(guide.device), mask.to(guide.device)
            out = guide(ids, mask)
            log_q = guide.log_q(out, 1.0, candidates, ids, mask)
            target = ids[:, 1:, None]
            take = comp[:, 1:].to(guide.device)
            out_p.append((out.log_p[:, :-1].gather(-1, target).squeeze(-1).double() * take).sum(1).cpu())
            out_q.append((log_q[:, :-1].gather(-1, target).squeeze(-1).double() * take).sum(1).cpu())
    return torch.cat(out_p), torch.cat(out_q)


def evaluate(
    guide: Guide,
    prompt: Sequence[int],
    oracle: TokenOracle | Callable,
    max_new_tokens: int,
    eos_token_id: int,
    candidates: int | None = None,
) -> ExactResult:
    """Enumerate every completion of ``prompt`` and compute exact p, q_theta (or q_k, ``candidates=k``) and
    labels."""
    vocab = guide.config.base_vocab_size
    if vocab**max_new_tokens > 5_000_000:
        raise ValueError(
            f"vocabulary {vocab} and {max_new_tokens} new tokens give too many sequences to enumerate"
        )
    completions = enumerate_completions(vocab, max_new_tokens, eos_token_id)
    labels = torch.tensor(
        call_oracle(oracle, [list(prompt)] * len(completions), completions), dtype=torch.float64
    )
    log_p, log_q = sequence_logprobs(guide, prompt, completions, candidates=candidates)
    return ExactResult(completions, labels, log_p, log_q)


# ---------------------------------------------------------------------- the standard tiny testbed
TOY_VOCAB = 6
TOY_EOS = 0
TOY_PROMPT = [0]  # GPT-2 style: the EOS token doubles as BOS, so the prompt itself holds an EOS
TOY_MAX_NEW_TOKENS = 6


def toy_base(
    seed: int = 0, vocab_size: int = TOY_VOCAB, width: int = 32, init_scale: float = 0.5
) -> GPT2LMHeadModel:
    """A randomly initialised 2-layer GPT-2 with peaked next-token distributions, for exact tests."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=width,
        n_layer=2,
        n_head=2,
        initializer_range=init_scale,
        bos_token_id=TOY_EOS,
        eos_token_id=TOY_EOS,
        pad_token_id=TOY_EOS,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    model.eval()
    return model


def toy_oracle(prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
    """The testbed's oracle: tokens 1 and 2 both appear in the completion."""
    return [float(1 in c and 2 in c) for c in completions]


# ---------------------------------------------------------------------- the conditional testbed
# Many prompts [BOS, k], each naming the keyword k the oracle requires: "k appears in the completion". A guide
# trained on the samples of some keywords is scored exactly on keywords it never saw: does it learn the rule
# ("use the token the prompt names") or only the seen keywords? The base is first taught to copy the named
# token now and then, as a pretrained LM can, so that the rule is within reach of a guide that reads the base.
COND_VOCAB = 24
COND_MAX_NEW_TOKENS = 3


def keyword_oracle(prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
    """The conditional testbed's oracle: the prompt's last token (the keyword) appears in the completion."""
    return [float(p[-1] in c) for p, c in zip(prompts, completions, strict=True)]


def copy_base(
    seed: int = 0,
    vocab_size: int = COND_VOCAB,
    copy_rate: float = 0.08,
    steps: int = 300,
    max_new_tokens: int = COND_MAX_NEW_TOKENS,
    width: int = 32,
) -> GPT2LMHeadModel:
    """A tiny GPT-2 pretrained (seeded, a few seconds) on sequences ``[BOS, k, x_1 .. x_n, EOS]`` in which each
    x_i is the named keyword k with probability ``copy_rate`` and otherwise a uniformly random non-EOS token,
    and the completion ends early with probability 1/4 per position. Every keyword is in its training data, as
    every word is in a real LM's: the base can copy, rarely, and the guide's job is to make it copy.
    """
    model = toy_base(seed, vocab_size=vocab_size, width=width, init_scale=0.02)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    batch, length = 256, 2 + max_new_tokens + 1
    for _ in range(steps):
        keys = torch.randint(1, vocab_size, (batch,), generator=generator)
        body = torch.randint(1, vocab_size, (batch, max_new_tokens + 1), generator=generator)
        copy = torch.rand((batch, max_new_tokens + 1), generator=generator) < copy_rate
        body = torch.where(copy, keys[:, None], body)
        stop = torch.rand((batch, max_new_tokens + 1), generator=generator) < 0.25
        stop[:, max_new_tokens] = True
        first_stop = stop.int().argmax(1)  # the EOS position in the completion
        cols = torch.arange(max_new_tokens + 1)[None, :]
        body = torch.where(cols == first_stop[:, None], torch.full_like(body, TOY_EOS), body)
        ids = torch.cat([torch.full((batch, 1), TOY_EOS), keys[:, None], body], dim=1)[:, :length]
        labels = ids.clone()
        labels[:, :2] = -100  # no loss on the prompt
        labels[:, 2:][cols > first_stop[:, None]] = -100  # nor after the EOS
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class ConditionalResult:
    """Exact results of one guide on each prompt of the conditional testbed, seen and held out."""

    seen: dict[int, ExactResult]
    held_out: dict[int, ExactResult]

    @staticmethod
    def _mean(results: dict[int, ExactResult], name: str) -> float:
        return sum(getattr(r, name) for r in results.values()) / max(1, len(results))

    def summary(self) -> dict[str, float]:
        """Mean KL(q*‖p), KL(q*‖q_theta), success under p and q_theta over the seen and the held-out prompts."""
        out: dict[str, float] = {}
        for split, results in (("seen", self.seen), ("held_out", self.held_out)):
            for name in ("kl_q_star_p", "kl_q_star_q", "success_p", "success_q"):
                out[f"{split}_{name}"] = self._mean(results, name)
        return out

    def __repr__(self) -> str:
        values = ", ".join(f"{k}={v:.4g}" for k, v in self.summary().items())
        return f"ConditionalResult({len(self.seen)} seen, {len(self.held_out)} held out, {values})"


def conditional_split(
    vocab_size: int = COND_VOCAB, held_out: int = 6, seed: int = 0
) -> tuple[list[int], list[int]]:
    """A seeded split of the keywords 1 .. V-1 into training keywords and held-out keywords."""
    keys = list(range(1, vocab_size))
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [keys[i] for i in order]
    return sorted(shuffled[held_out:]), sorted(shuffled[:held_out])


def evaluate_conditional(
    guide: Guide,
    seen: Sequence[int],
    held_out: Sequence[int],
    max_new_tokens: int = COND_MAX_NEW_TOKENS,
    candidates: int | None = None,
) -> ConditionalResult:
    """Exact results on every prompt ``[BOS, k]`` of the seen and the held-out keywords (``candidates=k``: of
    the candidate-restricted q_k that decoding with ``candidates=k`` samples from)."""

    def run(keys: Sequence[int]) -> dict[int, ExactResult]:
        return {
            k: evaluate(guide, [TOY_EOS, k], keyword_oracle, max_new_tokens, TOY_EOS, candidates=candidates)
            for k in keys
        }

    return ConditionalResult(run(seen), run(held_out))


def draw_conditional(results: dict[int, ExactResult], per_prompt: int, seed: int = 0) -> SampleSet:
    """Exact samples from p, ``per_prompt`` for each keyword's prompt, in one SampleSet."""
    prompts, completions, labels = [], [], []
    for i, (k, result) in enumerate(sorted(results.items())):
        part = result.draw(per_prompt, [TOY_EOS, k], seed=seed * 1_000_003 + i)
        prompts += part.prompts
        completions += part.completions
        labels += part.labels.tolist()
    return SampleSet.from_token_ids(
        prompts, completions, labels, None, {"sampling": {"proposal": "exact p", "seed": seed}}
    )
