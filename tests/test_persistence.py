import json

import pytest
import torch

from dinado import VARIANTS, Guide, SampleSet

from .conftest import CAUSAL_KINDS, randomize_guide, tiny_causal, tiny_gpt2


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip_reproduces_next_token_logprobs(tmp_path, variant, kind):
    guide = Guide.create(tiny_causal(kind), variant, num_layers=1)
    randomize_guide(guide)
    guide.save_pretrained(tmp_path / "g")
    loaded = Guide.from_pretrained(tmp_path / "g", tiny_causal(kind))
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # left padding too
    fresh = Guide.create(tiny_causal(kind), variant, num_layers=1).eval()
    with torch.no_grad():
        for m in (None, mask):
            expected = guide.eval().next_token_logprobs(ids, m)
            assert torch.equal(expected, loaded.eval().next_token_logprobs(ids, m))
            # the weights were really loaded: a fresh guide differs
            assert (expected - fresh.next_token_logprobs(ids, m)).abs().max() > 1e-2
    saved = json.loads((tmp_path / "g" / "dinado_config.json").read_text())
    assert saved["variant"] == variant and saved["base_vocab_size"] == 40 and saved["base_hidden_size"] == 32
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["dinado_config.json", "guide.safetensors"]


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_saved_guide_holds_only_its_own_weights(tmp_path, kind):
    from safetensors.torch import load_file

    guide = Guide.create(tiny_causal(kind), "dinado-merge")
    guide.save_pretrained(tmp_path)
    names = load_file(str(tmp_path / "guide.safetensors")).keys()
    assert names and all("lora_" in n or n.startswith("norm_head") for n in names)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize(
    "kwargs, what", [(dict(vocab_size=41), "vocabulary size 41"), (dict(width=48), "hidden size 48")]
)
def test_loading_onto_a_mismatched_base_is_refused(tmp_path, kwargs, what, kind):
    Guide.create(tiny_causal(kind), "nado").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"vocabulary size 40 and hidden size 32.*{what}"):
        Guide.from_pretrained(tmp_path, tiny_causal(kind, **kwargs))


def test_loading_from_a_directory_without_a_guide_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dinado_config.json not found"):
        Guide.from_pretrained(tmp_path, tiny_gpt2())


def test_sampleset_round_trip_keeps_everything(tmp_path):
    s = SampleSet.from_token_ids(
        [[0, 1], [0, 1], [0]],
        [[3, 0], [4], [5, 6, 0]],
        [1.0, 0.0, 0.25],
        log_weights=[0.1, -0.2, 0.3],
        metadata={"oracle": "x", "vocab_size": 40},
        token_log_p=[[-1.0, -2.0], [-0.5], [-1.0, -1.5, -0.25]],
        token_log_proposal=[[-1.5, -2.0], [-0.3], [-1.0, -1.0, -0.5]],
    )
    s.save(tmp_path / "s.safetensors")
    t = SampleSet.load(tmp_path / "s.safetensors")
    assert t.prompts == s.prompts and t.completions == s.completions
    assert torch.equal(t.labels, s.labels) and torch.equal(t.log_weights, s.log_weights)
    assert (
        t.metadata == s.metadata
        and t.token_log_p == s.token_log_p
        and t.token_log_proposal == s.token_log_proposal
    )
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left behind


def test_sampleset_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a dinado sample file"):
        SampleSet.load(tmp_path / "other.safetensors")
    with pytest.raises(FileNotFoundError, match="not found"):
        SampleSet.load(tmp_path / "missing.safetensors")
