"""Text in, text out: tokenise prompts and decode them in batches with a base model or a guide.

Decoder-only bases read ``prompt + completion`` in one left-padded sequence; encoder-decoder bases read the
prompt (the source) in the encoder, right-padded, and write the completion after the decoder start token.
These helpers hide that difference from the CLI, the baselines and the benchmarks.
"""

from __future__ import annotations

import string
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import SampleSet, pad_prompts
from .guide import Guide
from .hf import eval_mode, is_encoder_decoder, tokenizer_fingerprint
from .objectives import sequence_log_values
from .oracles import describe
from .sampling import label_samples

# End-of-turn tokens of common chat templates (ChatML, Llama 3, Gemma, Phi-3); an instruct model stops there.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
TEMPLATE_FIELDS = ("prompt", "keywords")


@dataclass(frozen=True)
class PromptFormat:
    """How a line of a prompts file becomes what the model reads.

    ``template`` is a Python format string with the slots ``{prompt}`` (the line) and ``{keywords}`` (the
    line read as a keyword list, :class:`dinado.oracles.KeywordList`, joined by ", "), e.g. ``"Write one
    short sentence that uses all of these words: {keywords}."``. ``chat=True`` puts the text in the user
    turn of the tokenizer's chat template and opens the assistant turn (instruct models); generation then
    ends at the template's end-of-turn token (:func:`end_of_turn_id`). Oracles keep reading the line itself,
    so a keyword oracle reads its keywords from the slot, not from the decorated prompt.
    """

    template: str = "{prompt}"
    chat: bool = False

    def __post_init__(self) -> None:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        except ValueError as exc:
            raise ValueError(f"prompt template {self.template!r} is not a format string: {exc}") from None
        unknown = sorted(fields - set(TEMPLATE_FIELDS))
        if unknown or not fields:
            raise ValueError(
                f"prompt template {self.template!r} must use the slot {{prompt}} or {{keywords}} (and no other; "
                f"found {', '.join(unknown) or 'none'}); write a literal brace as {{{{ or }}}}"
            )

    @property
    def is_plain(self) -> bool:
        return self.template == "{prompt}" and not self.chat

    def text(self, line: str) -> str:
        """The prompt text before any chat template."""
        from .oracles import KeywordList

        if "{keywords}" not in self.template:
            return self.template.format(prompt=line)
        return self.template.format(prompt=line, keywords=", ".join(KeywordList()(line)))

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "chat": self.chat}


def end_of_turn_id(tokenizer) -> int | None:
    """The token that ends an assistant turn in the tokenizer's chat template (else its EOS)."""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return int(vocab[token])
    return tokenizer.eos_token_id


def encode_prompts(
    tokenizer,
    prompts: Sequence[str],
    encoder_decoder: bool = False,
    prompt_format: PromptFormat | None = None,
) -> list[list[int]]:
    """Token ids of each prompt.

    Decoder-only: plain tokenisation without special tokens; an empty prompt becomes the BOS token (GPT-2
    style models start there). Encoder-decoder: the tokenizer's own special tokens are added (Marian and T5
    end a source with EOS, BART wraps it in BOS/EOS), and EOS is appended when the tokenizer adds none.
    ``prompt_format`` fills a template with each prompt and, with ``chat=True``, applies the chat template.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    if prompt_format is not None and not prompt_format.is_plain:
        prompts = [prompt_format.text(p) for p in prompts]
        if prompt_format.chat:
            if encoder_decoder:
                raise ValueError("chat templates are for decoder-only (instruct) models: use chat=False")
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(
                    "the tokenizer has no chat template: decode without chat (--chat false) or give a "
                    "tokenizer that has one"
                )
            prompts = [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts
            ]
    if encoder_decoder:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos_token_id, which ends every encoder input: set one")
        rows = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        return [list(row) if row and row[-1] == eos else [*row, eos] for row in rows]
    rows = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [list(row) if row else [bos] for row in rows]


def encode_targets(
    tokenizer,
    targets: Sequence[str],
    encoder_decoder: bool = False,
    prompt_format: PromptFormat | None = None,
) -> list[list[int]]:
    """Token ids of each target as the model should produce it after its prompt, ended as generation ends.

    After a plain prompt: ``" " + target`` and EOS. With a chat ``prompt_format`` the target fills the
    assistant turn that the template opened and ends with the end-of-turn token (:func:`end_of_turn_id`).
    Encoder-decoder: ``target`` and EOS (the decoder starts from its start token)."""
    if isinstance(targets, str):
        raise TypeError("targets must be a sequence of strings, not one string")
    chat = prompt_format is not None and prompt_format.chat
    end = end_of_turn_id(tokenizer) if chat else tokenizer.eos_token_id
    if end is None:
        raise ValueError("the tokenizer has no eos_token_id to end a target with: set one")
    lead = "" if chat or encoder_decoder else " "
    rows = tokenizer([lead + t for t in targets], add_special_tokens=False)["input_ids"]
    return [[*row, end] for row in rows]


def reference_samples(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[str],
    oracle,
    prompt_format: PromptFormat | None = None,
    decoder_start_token_id: int | None = None,
    batch_size: int = 64,
) -> SampleSet:
    """Gold targets as training samples: the DiNADO authors' option of adding references to the samples from p.

    Each ``(prompt, target)`` pair becomes the prompt's ids (as :func:`encode_prompts` writes them) and the
    target's (:func:`encode_targets`), labelled by ``oracle`` on token ids as :func:`dinado.sample` labels its
    samples. They carry no importance weight (log weight 0 when joined to weighted samples with
    :meth:`SampleSet.concat`): they are not drawn from p, so adding them biases R_theta upward, towards the
    references. Off in every recipe unless asked for; report it when used. ``decoder_start_token_id``: the
    samples are for an encoder-decoder base that starts decoding there.
    """
    if isinstance(prompts, str) or isinstance(targets, str):
        raise TypeError("prompts and targets must be sequences of strings, not one string")
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts and {len(targets)} targets: give one target per prompt")
    if not prompts:
        raise ValueError("no references: prompts and targets are empty")
    seq2seq = decoder_start_token_id is not None
    prompt_ids = encode_prompts(tokenizer, prompts, seq2seq, prompt_format)
    completions = encode_targets(tokenizer, targets, seq2seq, prompt_format)
    labels = label_samples(oracle, prompt_ids, completions, batch_size)
    metadata: dict[str, Any] = {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "oracle": describe(oracle),
        "sampling": {"proposal": "references", "prompt_format": (prompt_format or PromptFormat()).to_dict()},
    }
    if seq2seq:
        metadata["decoder_start_token_id"] = int(decoder_start_token_id)
    return SampleSet.from_token_ids(prompt_ids, completions, labels, metadata=metadata)


def new_tokens(sequences: torch.Tensor, prompt_width: int, encoder_decoder: bool) -> torch.Tensor:
    """The generated part of ``generate()``'s output: after the prompt, or after the decoder start token."""
    return sequences[:, 1:] if encoder_decoder else sequences[:, prompt_width:]


def generate_texts(
    source,
    tokenizer,
    prompts: list[str],
    batch_size: int = 32,
    alpha: float = 1.0,
    prompt_format: PromptFormat | None = None,
    rerank: Guide | None = None,
    **generate_kwargs: Any,
) -> tuple[list[str], int, float]:
    """Decode ``prompts`` with a base model or a Guide: (completions, new tokens, seconds).

    With a chat ``prompt_format``, generation ends at the chat template's end-of-turn token unless
    ``eos_token_id`` is given. ``rerank``: a guide whose value picks the output of beam search (``num_beams``
    >= 2, no sampling): every final beam is kept and each prompt gets the one with the highest R_theta(x) of that
    guide (:func:`rerank_by_value`; no oracle call). It may be the decoding guide itself, or the
    guide whose adapter a merged ``source`` holds at another scale. New tokens count the returned outputs'."""
    from .decoding import generate as guided_generate
    from .hf import check_length, decoder_start_token_id

    beams = generate_kwargs.get("num_beams") or 1
    if rerank is not None:
        if beams < 2 or generate_kwargs.get("do_sample"):
            raise ValueError(
                f"rerank picks one of beam search's final beams: it needs num_beams >= 2 and no sampling "
                f"(got num_beams={beams}, do_sample={generate_kwargs.get('do_sample', False)})"
            )
        if generate_kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError("rerank returns one output per prompt: leave num_return_sequences unset")
        generate_kwargs["num_return_sequences"] = beams

    model = source.base if isinstance(source, Guide) else source
    seq2seq = is_encoder_decoder(model)
    rows = encode_prompts(tokenizer, prompts, seq2seq, prompt_format)
    if prompt_format is not None and prompt_format.chat:
        generate_kwargs.setdefault("eos_token_id", end_of_turn_id(tokenizer))
    check_length(model, max(map(len, rows)), generate_kwargs.get("max_new_tokens"))
    device = next(model.parameters()).device  # the batches go where the model is (a GPU, say)
    if rerank is not None:  # where each beam ends, and an encoder-decoder's decoder start, for reading values
        stops = _stop_ids(model, generate_kwargs)
        first = decoder_start_token_id(model) if seq2seq else None
    outputs, count, start = [], 0, time.perf_counter()
    with eval_mode(source):  # no dropout while decoding; the caller's modes come back afterwards
        for i in range(0, len(rows), batch_size):
            ids, mask = pad_prompts(rows[i : i + batch_size], tokenizer.pad_token_id, seq2seq)
            ids, mask = ids.to(device), mask.to(device)
            if isinstance(source, Guide):
                seqs = guided_generate(source, ids, mask, alpha=alpha, **generate_kwargs)
            else:
                seqs = source.generate(ids, attention_mask=mask, **generate_kwargs)
            gen = new_tokens(seqs, ids.shape[1], seq2seq)
            if rerank is not None:
                gen = gen.view(len(ids), beams, -1)
                candidates = [[_until_stop(row, stops) for row in group] for group in gen.tolist()]
                picks = rerank_by_value(
                    rerank, rows[i : i + batch_size], candidates, decoder_start_token_id=first
                )
                gen = gen[torch.arange(len(ids)), torch.tensor(picks)]
            count += int((gen != tokenizer.pad_token_id).sum())
            outputs.extend(t.strip() for t in tokenizer.batch_decode(gen, skip_special_tokens=True))
    return outputs, count, time.perf_counter() - start


def _stop_ids(model, generate_kwargs: dict) -> set[int]:
    """The end-of-sequence ids generation stops at: ``eos_token_id`` as given, else the model's generation config's."""
    eos = generate_kwargs.get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _until_stop(row: list[int], stops: set[int]) -> list[int]:
    """A generated row up to and including its first stop id (the padding after it dropped); whole if none."""
    for j, token in enumerate(row):
        if token in stops:
            return row[: j + 1]
    return row


def candidate_log_values(
    guide: Guide,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    batch_size: int = 16,
    decoder_start_token_id: int | None = None,
) -> list[list[float]]:
    """log R_theta(x) of each prompt's candidate completions (token ids, EOS included where it ended), grouped as
    ``candidates`` is (:func:`dinado.objectives.sequence_log_values`). ``decoder_start_token_id``: the base's,
    for an encoder-decoder base (``prompts`` are then the encoder inputs)."""
    if len(prompts) != len(candidates):
        raise ValueError(
            f"{len(prompts)} prompts but {len(candidates)} candidate lists: give one list per prompt"
        )
    empty = [i for i, group in enumerate(candidates) if not group]
    if empty:
        raise ValueError(f"prompt {empty[0]} has no candidate completion: give at least one per prompt")
    meta = {"decoder_start_token_id": decoder_start_token_id} if decoder_start_token_id is not None else None
    flat_prompts = [list(prompts[i]) for i, group in enumerate(candidates) for _ in group]
    flat = [list(c) for group in candidates for c in group]
    samples = SampleSet.from_token_ids(flat_prompts, flat, [0.0] * len(flat), metadata=meta)
    values = iter(sequence_log_values(guide, samples, batch_size).tolist())
    return [[next(values) for _ in group] for group in candidates]


def rerank_by_value(
    guide: Guide,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[Sequence[Sequence[int]]],
    batch_size: int = 16,
    decoder_start_token_id: int | None = None,
) -> list[int]:
    """For each prompt, the index of its candidate completion with the highest value R_theta(x)
    (:func:`candidate_log_values`), the earlier candidate on a tie: reranks beam search's final beams by the
    guide's own estimate of the oracle, with no oracle call."""
    grouped = candidate_log_values(guide, prompts, candidates, batch_size, decoder_start_token_id)
    return [max(range(len(scores)), key=lambda j: (scores[j], -j)) for scores in grouped]
