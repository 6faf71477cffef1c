"""The data a guide learns from: SampleSet (labelled completions with importance weights, stored as safetensors +
JSON metadata), the training Batch it collates into, and the padding helpers every stage uses."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ._utils import atomic_file

FORMAT_VERSION = 1


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    completion_mask: torch.Tensor  # [B, L] 1 on completion tokens
    terminal_mask: torch.Tensor  # [B, L] 1 on the terminal completion token (EOS or last at the cap)
    labels: torch.Tensor  # [B] oracle values in [0, 1]
    weights: torch.Tensor  # [B] importance weights (1 for samples from p)
    # encoder-decoder bases: the source, right-padded; input_ids are then the decoder rows [start | completion]
    encoder_input_ids: torch.Tensor | None = None
    encoder_attention_mask: torch.Tensor | None = None
    # the frozen base's last hidden states of these rows [B, L, H], from a FeatureCache: when set, the loss
    # reads them instead of running the base (module variants only; see features.py)
    base_hidden: torch.Tensor | None = None
    # DiNADO-Merge: base_hidden is the input of its lowest adapted layer; this, where the cache holds them, the
    # base's last hidden states [B, L, H] (log p without running the layers above without the adapter)
    base_last_hidden: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device) if v is not None else None for k, v in self.__dict__.items()})


def _check_id_lists(name: str, rows: Sequence[Sequence[int]], allow_empty: bool) -> list[list[int]]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        row = list(row)
        if not row and not allow_empty:
            raise ValueError(f"{name}[{i}] is empty: every {name[:-1]} needs at least one token")
        for tok in row:
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise ValueError(f"{name}[{i}] holds {tok!r}: token ids must be non-negative integers")
        out.append(row)
    return out


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, max length] ids padded on the left with ``pad_id`` (decoder-only prompts), and the mask."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        if len(row):
            ids[r, length - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
            mask[r, length - len(row) :] = 1
    return ids, mask


def right_pad(
    rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, width] ids padded on the right with ``pad_id``, and the attention mask (1 on the rows' own tokens).

    ``width`` defaults to the longest row; a fixed width (a model's context) must hold every row.
    """
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    longest = int(lengths.max()) if len(rows) else 0
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"a row of {longest} tokens does not fit the padded width {width}")
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)  # row-major order = the rows' order
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    if len(rows):
        ids[mask] = torch.cat([torch.as_tensor(list(r), dtype=torch.long).reshape(-1) for r in rows])
    return ids, mask.long()


def pad_prompts(
    rows: Sequence[Sequence[int]], pad_id: int, encoder_decoder: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ids and mask as ``generate()`` wants them: left-padded, or right-padded for an encoder."""
    return (right_pad if encoder_decoder else left_pad)(rows, pad_id)


def _flatten(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.long)
    return flat, offsets


def _unflatten(flat: torch.Tensor, offsets: torch.Tensor) -> list[list[int]]:
    values, bounds = flat.tolist(), offsets.tolist()
    return [values[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)]


# metadata that says which base and tokenizer drew a sample set: parts of one set must agree on them
_SAME_BASE_KEYS = ("base_fingerprint", "tokenizer_fingerprint", "vocab_size", "decoder_start_token_id")


class SampleSet:
    """Prompts, completions, oracle labels in [0, 1] and optional whole-sequence log importance weights.

    ``log_weights[i] = log p(x_i | c_i) - log pi(x_i | c_i)`` for a sample drawn from a proposal ``pi``;
    ``None`` means the samples come from the base model itself.
    """

    def __init__(
        self,
        prompts: list[list[int]],
        completions: list[list[int]],
        labels: torch.Tensor,
        log_weights: torch.Tensor | None = None,
        metadata: dict[str, Any] | None = None,
        token_log_p: list[list[float]] | None = None,
        token_log_proposal: list[list[float]] | None = None,
    ) -> None:
        self.prompts = prompts
        self.completions = completions
        self.labels = labels
        self.log_weights = log_weights
        self.metadata = dict(metadata or {})
        # per-token log p and log pi of each completion, as recorded by the sampler (optional)
        self.token_log_p = token_log_p
        self.token_log_proposal = token_log_proposal

    @classmethod
    def from_token_ids(
        cls,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        labels: Sequence[float],
        log_weights: Sequence[float] | None = None,
        metadata: dict[str, Any] | None = None,
        token_log_p: Sequence[Sequence[float]] | None = None,
        token_log_proposal: Sequence[Sequence[float]] | None = None,
    ) -> SampleSet:
        """Validate and store lists of token-id lists with one label (and log weight) per sample."""
        n = len(prompts)
        sizes = {"prompts": n, "completions": len(completions), "labels": len(labels)}
        if log_weights is not None:
            sizes["log_weights"] = len(log_weights)
        if len(set(sizes.values())) != 1:
            got = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise ValueError(f"prompts, completions and labels must have the same length; got {got}")
        if n == 0:
            raise ValueError("a SampleSet needs at least one sample")
        prompt_rows = _check_id_lists("prompts", prompts, allow_empty=False)
        completion_rows = _check_id_lists("completions", completions, allow_empty=False)
        label_t = torch.as_tensor([float(x) for x in labels], dtype=torch.float32)
        bad = torch.nonzero(~torch.isfinite(label_t) | (label_t < 0) | (label_t > 1)).flatten()
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"labels[{i}] = {float(label_t[i])!r}: labels must be finite numbers in [0, 1]")
        lw = None
        if log_weights is not None:
            lw = torch.as_tensor([float(x) for x in log_weights], dtype=torch.float64)
            bad = torch.nonzero(~torch.isfinite(lw)).flatten()
            if len(bad):
                i = int(bad[0])
                raise ValueError(
                    f"log_weights[{i}] = {float(lw[i])!r}: log importance weights must be finite"
                )
        per_token = []
        for name, rows in (("token_log_p", token_log_p), ("token_log_proposal", token_log_proposal)):
            if rows is not None:
                rows = [[float(v) for v in r] for r in rows]
                bad = [
                    i for i, (r, c) in enumerate(zip(rows, completion_rows, strict=False)) if len(r) != len(c)
                ]
                if len(rows) != n or bad:
                    raise ValueError(
                        f"{name} needs one value per completion token (first mismatch: sample {bad[:1]})"
                    )
            per_token.append(rows)
        return cls(prompt_rows, completion_rows, label_t, lw, metadata, *per_token)

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        weighted = "weighted" if self.log_weights is not None else "unweighted"
        return f"SampleSet({len(self)} samples, {self.positive_rate:.3f} mean label, {weighted})"

    @property
    def positive_rate(self) -> float:
        return float(self.labels.mean())

    def group_ids(self) -> torch.Tensor:
        """An integer per sample naming its prompt (condition) group."""
        index: dict[tuple[int, ...], int] = {}
        return torch.tensor([index.setdefault(tuple(p), len(index)) for p in self.prompts], dtype=torch.long)

    def normalized_weights(self, clip: float | None = None) -> torch.Tensor:
        """Self-normalised importance weights per prompt group, scaled to mean 1 within each group.

        ``clip`` caps each normalised weight (a bias-for-variance trade that should be reported).
        """
        if self.log_weights is None:
            return torch.ones(len(self))
        groups = self.group_ids()
        num_groups = int(groups.max()) + 1
        lw = self.log_weights
        group_max = torch.full((num_groups,), -math.inf, dtype=lw.dtype).scatter_reduce(
            0, groups, lw, reduce="amax"
        )
        shifted = (lw - group_max[groups]).exp()
        totals = torch.zeros(num_groups, dtype=lw.dtype).index_add(0, groups, shifted)
        counts = torch.bincount(groups, minlength=num_groups).to(lw.dtype)
        w = shifted / totals[groups] * counts[groups]
        if clip is not None:
            if clip <= 0:
                raise ValueError(f"weight clip must be positive, got {clip}")
            w = w.clamp(max=clip)
        return w.float()

    def subset(self, indices: Sequence[int]) -> SampleSet:
        idx = list(indices)
        lw = self.log_weights[idx] if self.log_weights is not None else None
        pick = lambda rows: [rows[i] for i in idx] if rows is not None else None
        return SampleSet(
            pick(self.prompts),
            pick(self.completions),
            self.labels[idx],
            lw,
            dict(self.metadata),
            pick(self.token_log_p),
            pick(self.token_log_proposal),
        )

    def with_labels(self, labels: Sequence[float] | torch.Tensor) -> SampleSet:
        """The same samples with other oracle values (another oracle's, or soft ones), one in [0, 1] per sample;
        weights, metadata and per-token log-probabilities are kept. ``self`` is not changed."""
        values = torch.as_tensor(labels, dtype=torch.float32).flatten().clone()
        if values.numel() != len(self):
            raise ValueError(f"got {values.numel()} labels for {len(self)} samples: give one per sample")
        bad = ~torch.isfinite(values) | (values < 0) | (values > 1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ValueError(f"label {i} is {float(values[i])!r}: labels must be finite and in [0, 1]")
        return SampleSet(
            list(self.prompts),
            list(self.completions),
            values,
            self.log_weights.clone() if self.log_weights is not None else None,
            dict(self.metadata),
            self.token_log_p,
            self.token_log_proposal,
        )

    @classmethod
    def concat(cls, parts: Sequence[SampleSet]) -> SampleSet:
        """One set holding every sample of ``parts``, in order: e.g. samples from p and gold references
        (:func:`dinado.reference_samples`), or samples from p and from a proposal. None of the parts is changed.

        A part without importance weights (samples from p, or references, which the DiNADO authors add with no
        weight) gets log weight 0 when another part has weights. Per-token log-probabilities are kept only when
        every part has them. Parts recorded as drawn from different bases or tokenizers are refused. The
        metadata is the first part's, completed by the others' base fields, with ``parts``: each part's size,
        proposal and oracle.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("SampleSet.concat needs at least one sample set")
        for i, part in enumerate(parts):
            if not isinstance(part, SampleSet):
                raise TypeError(f"parts[{i}] is a {type(part).__name__}, not a SampleSet")
        metadata = dict(parts[0].metadata)
        for i, part in enumerate(parts[1:], start=1):
            for key in _SAME_BASE_KEYS:
                mine, theirs = metadata.get(key), part.metadata.get(key)
                if mine is not None and theirs is not None and mine != theirs:
                    raise ValueError(
                        f"parts[0] and parts[{i}] differ in {key} ({mine!r} vs {theirs!r}): samples for one guide "
                        "must come from the same base and tokenizer"
                    )
                if mine is None and theirs is not None:
                    metadata[key] = theirs
        metadata["parts"] = [
            {
                "samples": len(part),
                "proposal": (part.metadata.get("sampling") or {}).get("proposal"),
                "oracle": part.metadata.get("oracle"),
            }
            for part in parts
        ]
        log_weights = None
        if any(part.log_weights is not None for part in parts):
            log_weights = torch.cat(
                [
                    part.log_weights
                    if part.log_weights is not None
                    else torch.zeros(len(part), dtype=torch.float64)
                    for part in parts
                ]
            )

        def joined(name: str) -> list | None:
            rows = [getattr(part, name) for part in parts]
            return None if any(r is None for r in rows) else [list(v) for r in rows for v in r]

        return cls(
            [list(p) for part in parts for p in part.prompts],
            [list(c) for part in parts for c in part.completions],
            torch.cat([part.labels for part in parts]).clone(),
            log_weights,
            metadata,
            joined("token_log_p"),
            joined("token_log_proposal"),
        )

    @property
    def decoder_start_token_id(self) -> int | None:
        """Set for samples from an encoder-decoder base: prompts are then encoder inputs."""
        start = self.metadata.get("decoder_start_token_id")
        return int(start) if start is not None else None

    def collate(self, indices: Sequence[int], weights: torch.Tensor | None = None, pad_id: int = 0) -> Batch:
        """Right-padded tensors for ``indices`` with masks that keep padding, EOS and the prompt apart.

        Samples from an encoder-decoder base (``decoder_start_token_id`` set) give decoder rows
        ``[start | completion]`` and the prompts as right-padded encoder inputs.
        """
        start = self.decoder_start_token_id
        if start is not None:
            encoder_ids, encoder_mask = right_pad([self.prompts[i] for i in indices], pad_id)
            rows = [[start] + self.completions[i] for i in indices]
            prompt_lengths = [1] * len(rows)
        else:
            encoder_ids = encoder_mask = None
            rows = [self.prompts[i] + self.completions[i] for i in indices]
            prompt_lengths = [len(self.prompts[i]) for i in indices]
        length = max(len(r) for r in rows)
        b = len(rows)
        input_ids = torch.full((b, length), pad_id, dtype=torch.long)
        attention = torch.zeros((b, length), dtype=torch.long)
        completion = torch.zeros((b, length), dtype=torch.long)
        terminal = torch.zeros((b, length), dtype=torch.long)
        for r, i in enumerate(indices):
            p, c = prompt_lengths[r], len(self.completions[i])
            input_ids[r, : p + c] = torch.tensor(rows[r])
            attention[r, : p + c] = 1
            completion[r, p : p + c] = 1
            terminal[r, p + c - 1] = 1
        w = weights[list(indices)] if weights is not None else torch.ones(b)
        return Batch(
            input_ids,
            attention,
            completion,
            terminal,
            self.labels[list(indices)],
            w,
            encoder_input_ids=encoder_ids,
            encoder_attention_mask=encoder_mask,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file (token ids, offsets, labels, weights) with JSON metadata in its header."""
        path = Path(path)
        if path.exists() and path.is_dir():
            raise IsADirectoryError(
                f"{path} is a directory; SampleSet.save needs a file path (e.g. samples.safetensors)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        prompts, prompt_offsets = _flatten(self.prompts)
        completions, completion_offsets = _flatten(self.completions)
        tensors = {
            "prompts": prompts,
            "prompt_offsets": prompt_offsets,
            "completions": completions,
            "completion_offsets": completion_offsets,
            "labels": self.labels.float(),
        }
        if self.log_weights is not None:
            tensors["log_weights"] = self.log_weights.double()
        for name in ("token_log_p", "token_log_proposal"):
            rows = getattr(self, name)
            if rows is not None:
                tensors[name] = torch.tensor([v for r in rows for v in r], dtype=torch.float64)
        header = {"dinado_format": str(FORMAT_VERSION), "metadata": json.dumps(self.metadata, sort_keys=True)}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SampleSet:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"sample file {path} not found")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("dinado_format") != str(FORMAT_VERSION):
            raise ValueError(f"{path} is not a dinado sample file (format {header.get('dinado_format')!r})")
        t = load_file(str(path))
        per_token = lambda name: _unflatten(t[name], t["completion_offsets"]) if name in t else None
        return cls.from_token_ids(
            _unflatten(t["prompts"], t["prompt_offsets"]),
            _unflatten(t["completions"], t["completion_offsets"]),
            t["labels"].tolist(),
            t["log_weights"].tolist() if "log_weights" in t else None,
            json.loads(header.get("metadata", "{}")),
            per_token("token_log_p"),
            per_token("token_log_proposal"),
        )
