"""GuideConfig: everything needed to rebuild a guide over its base model, serialisable to JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

VARIANTS = ("nado", "dinado-hard", "dinado-soft", "dinado-merge")
CE_POSITIONS = ("all", "terminal")
CONSISTENCY = ("soft", "hard")
HEADS = ("full", "tied")
# what a saved config without these keys (written before they existed) meant
PRE_POINTER_DEFAULTS = {"head": "full", "head_rank": None, "read_tokens": False, "pointer": False}
# head_rank="auto": a rank-AUTO_HEAD_RANK head on vocabularies of AUTO_HEAD_RANK_VOCAB tokens or more, else full rank.
# Measured (docs/benchmarks.md, GPT-2-small's shape): the full-rank head's [V, dim] matrix costs as much per token
# as the base's LM head (1.42x the base's decoding time); rank 64 decodes at 1.11x and lost no exact KL on the
# conditional testbed nor held-out CommonGen success on SmolLM2 (docs/results/commongen.md).
AUTO_HEAD_RANK = 64
AUTO_HEAD_RANK_VOCAB = 32768


@dataclass
class GuideConfig:
    """Configuration of a guide.

    variant: one of ``nado``, ``dinado-hard``, ``dinado-soft``, ``dinado-merge``.
    num_layers / module_dim / num_heads: the small transformer stack over the base's last hidden
        states (NADO, DiNADO-Soft, DiNADO-Hard). ``module_dim=None`` takes the base width capped at 1024.
    lora_r / lora_alpha / lora_dropout / lora_target_modules: the PEFT LoRA adapter (DiNADO-Merge).
    regularizer_weight: weight of the consistency regulariser KL(Bern(S) || Bern(R)); ``None`` means the
        variant's default (1.0, or 0.0 for Hard consistency, where it vanishes identically).
    ce_positions: ``"all"`` puts the cross-entropy on every completion prefix, ``"terminal"`` only on the
        terminal prefix (the EOS token, or the last token at the length cap).
    head: the module's token head (NADO, DiNADO-Soft, DiNADO-Hard). ``"full"``: its own dim x V linear map.
        ``"tied"``: the module predicts a vector in the base's hidden space (a zero-initialised dim x H map) and the
        direction is its product with the base's own output embeddings, so any token the base can name can be
        boosted, whether or not it was seen in a training positive; no parameter per token.
    head_rank: ``"auto"`` (the default) picks rank 64 on vocabularies of 32,768 tokens or more and full rank
        below (decided when the config is made, from ``base_vocab_size``: the saved config holds the number).
        A low-rank head: the direction's [V, *] matrix has ``head_rank`` columns instead of the module's
        width (full head: its own [V, r] matrix after a fixed-shape dim -> r projection) or the base's width (tied
        head: E @ U with U a learned [H, r] map, computed once per decoding run), so the per-token cost of the
        head falls from V x dim (or V x H) to V x r. ``None``: full rank.
    read_tokens: the module also reads the base's input embedding of each token (added to its projected hidden
        state), so it can see which tokens the prompt names, not only what the base predicts after them.
    pointer: the module also adds a learned score to the direction of every token that occurs earlier in the
        sequence (:class:`dinado.modules.PointerScores`): a copy mechanism, so "use the words the prompt names"
        can be learned as a rule instead of word by word. ``None`` (the default) means on for the module variants
        (on the exact conditional testbed it is what lets them help on prompts they never saw,
        docs/results/commongen.md) and off for ``dinado-merge``, which has no module.
    consistency: ``"soft"`` predicts the norm at every position (regulariser), ``"hard"`` carries it forward
        by the Bellman equation from a learned root value. Fixed by the variant for the module variants;
        selectable for ``dinado-merge``.
    base_* / tokenizer_fingerprint: what the guide was built for (name, sizes, a hash of the base's weights
        and of the tokenizer), checked when it is loaded onto a base model or trained on samples.
    """

    variant: str = field(metadata={"help": "nado, dinado-hard, dinado-soft or dinado-merge"})
    num_layers: int = field(default=2, metadata={"help": "guide module layers"})
    module_dim: int | None = field(
        default=None, metadata={"help": "guide module width (default: the base's width, at most 1024)"}
    )
    num_heads: int | None = field(
        default=None, metadata={"help": "attention heads of the guide module (default: from its width)"}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (dinado-merge)"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (dinado-merge)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (dinado-merge)"})
    lora_target_modules: str | list[str] = field(
        default="all-linear",
        metadata={
            "help": "layers LoRA adapts (dinado-merge): all-linear, comma-separated module names, or one regular "
            "expression matched against full module names"
        },
    )
    regularizer_weight: float | None = field(
        default=None, metadata={"help": "consistency regulariser weight (default: the variant's)"}
    )
    ce_positions: str = field(
        default="all", metadata={"help": "cross-entropy on 'all' prefixes or the 'terminal' one"}
    )
    consistency: str | None = field(
        default=None,
        metadata={"help": "'soft' or 'hard' (fixed by the module variants; dinado-merge: either)"},
    )
    max_positions: int = field(default=2048, metadata={"help": "positions the guide module can read"})
    head: str = field(
        default="full",
        metadata={"help": "guide token head: 'full' (its own) or 'tied' (the base's output embeddings)"},
    )
    head_rank: int | str | None = field(
        default="auto",
        metadata={
            "help": f"rank of the guide token head's [V, r] matrix: auto ({AUTO_HEAD_RANK} on vocabularies of "
            f"{AUTO_HEAD_RANK_VOCAB:,}+ tokens, else full rank), a whole number, or null (full rank)",
            "kind": "rank",
        },
    )
    read_tokens: bool = field(
        default=False, metadata={"help": "the guide module also reads the base's embedding of each token"}
    )
    pointer: bool | None = field(
        default=None,
        metadata={
            "help": "the guide module scores earlier tokens for copying, e.g. prompt keywords (module variants)"
        },
    )
    base_model_name: str | None = None
    base_vocab_size: int | None = None
    base_hidden_size: int | None = None
    tokenizer_fingerprint: str | None = None
    base_fingerprint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")
        if self.ce_positions not in CE_POSITIONS:
            raise ValueError(f"ce_positions must be one of {CE_POSITIONS}, got {self.ce_positions!r}")
        implied = {"dinado-hard": "hard", "dinado-soft": "soft"}.get(self.variant)
        if self.variant == "nado":
            if self.consistency not in (None, "soft"):
                raise ValueError("nado has no 'hard' consistency; use variant='dinado-hard'")
            self.consistency = "soft"
        elif implied is not None:
            if self.consistency not in (None, implied):
                raise ValueError(
                    f"variant {self.variant!r} fixes consistency={implied!r}; "
                    f"use variant='dinado-{self.consistency}' instead"
                )
            self.consistency = implied
        else:
            self.consistency = self.consistency or "soft"
            if self.consistency not in CONSISTENCY:
                raise ValueError(f"consistency must be one of {CONSISTENCY}, got {self.consistency!r}")
        if self.pointer is None:
            self.pointer = self.variant != "dinado-merge"
        elif self.pointer and self.variant == "dinado-merge":
            raise ValueError(
                "pointer is an option of the guide module; dinado-merge has none (use pointer=False)"
            )
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.head_rank == "auto":  # decided once, from the base's vocabulary (unknown: full rank)
            large = (self.base_vocab_size or 0) >= AUTO_HEAD_RANK_VOCAB
            self.head_rank = AUTO_HEAD_RANK if large and self.variant != "dinado-merge" else None
        if self.head_rank is not None and (
            isinstance(self.head_rank, bool) or not isinstance(self.head_rank, int) or self.head_rank < 1
        ):
            raise ValueError(
                f"head_rank must be a positive integer, 'auto' or None (full rank), got {self.head_rank!r}"
            )
        if self.head_rank is not None and self.variant == "dinado-merge":
            raise ValueError("head_rank is an option of the guide module's head; dinado-merge has none")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {self.num_layers}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be at least 1, got {self.lora_r}")
        if self.regularizer_weight is not None and self.regularizer_weight < 0:
            raise ValueError(f"regularizer_weight must be >= 0, got {self.regularizer_weight}")

    @property
    def uses_lora(self) -> bool:
        return self.variant == "dinado-merge"

    @property
    def effective_regularizer_weight(self) -> float:
        if self.regularizer_weight is not None:
            return float(self.regularizer_weight)
        return 0.0 if self.consistency == "hard" else 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuideConfig:
        # a config saved before the head options existed describes the guide it had: full head, no extras
        data = {**PRE_POINTER_DEFAULTS, **data}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown guide config keys: {', '.join(unknown)}")
        return cls(**data)
