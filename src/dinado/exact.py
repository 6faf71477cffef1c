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

from .guide import Guide, eval_mode
from .oracles import TokenOracle, call_oracle
from .samples import SampleSet


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
    guide: Guide, prompt: Sequence[int], completions: list[list[int]], batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x | c), log q_theta(x | c)) for each completion, summed over its tokens, in float64."""
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
            log_q = guide.parameterization.log_q(out.log_p, out.direction)
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
) -> ExactResult:
    """Enumerate every completion of ``prompt`` and compute exact p, q_theta and labels."""
    vocab = guide.config.base_vocab_size
    if vocab**max_new_tokens > 5_000_000:
        raise ValueError(
            f"vocabulary {vocab} and {max_new_tokens} new tokens give too many sequences to enumerate"
        )
    completions = enumerate_completions(vocab, max_new_tokens, eos_token_id)
    labels = torch.tensor(
        call_oracle(oracle, [list(prompt)] * len(completions), completions), dtype=torch.float64
    )
    log_p, log_q = sequence_logprobs(guide, prompt, completions)
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
