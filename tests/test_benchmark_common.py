"""benchmarks/common.py: the shared logger, markdown tables, stage timer and the two effective sample sizes."""

import math
import sys
from pathlib import Path

import torch

from dinado.data import SampleSet

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import Timer, logger, markdown_table, mean_group_ess, pooled_ess  # noqa: E402


def weighted(log_weights):
    # two prompt groups of two samples: weights (1, 3) in group 0, (2, 2) in group 1
    return SampleSet(
        prompts=[[1], [1], [2], [2]],
        completions=[[5], [6], [7], [8]],
        labels=torch.tensor([1.0, 0.0, 1.0, 0.0]),
        log_weights=torch.tensor(log_weights),
    )


def test_the_two_effective_sample_sizes_differ_as_defined():
    samples = weighted([0.0, math.log(3.0), 0.0, 0.0])
    # (float32 weights: 1e-5)
    # normalised to mean 1 per group: (0.5, 1.5) and (1, 1); pooled: 4^2 / (0.25 + 2.25 + 1 + 1) = 3.555...
    assert abs(pooled_ess(samples) - 16 / 4.5) < 1e-5
    # per group: 2^2 / 2.5 = 1.6 and 2^2 / 2 = 2; mean 1.8
    assert abs(mean_group_ess(samples) - 1.8) < 1e-5
    plain = weighted([0.0, 0.0, 0.0, 0.0])
    assert abs(pooled_ess(plain) - 4) < 1e-5 and abs(mean_group_ess(plain) - 2) < 1e-5


def test_logger_table_and_timer(capsys):
    logger("x", "stdout")("hello")
    logger()("to stderr")
    out, err = capsys.readouterr()
    assert out == "[x] hello\n" and err == "to stderr\n"
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    lines = []
    timer = Timer(lines.append)
    with timer.stage("work"):
        pass
    assert list(timer.seconds) == ["work"] and timer.seconds["work"] >= 0
    assert lines[0] == "work ..." and lines[1].startswith("work: ")


def test_decode_overhead_parses_its_heads_and_their_defaults():
    from .conftest import load_benchmark

    bench = load_benchmark("decode_overhead.py")
    assert bench.parse_head("full:none") == {"head": "full", "head_rank": None}
    assert bench.parse_head("tied:64/256") == {"head": "tied", "head_rank": 64, "module_dim": 256}
    assert bench.parse_head("full") == {"head": "full"}  # the default head_rank ("auto")
    args = bench.parse_args([])
    assert all(isinstance(h, dict) and h["head"] in ("full", "tied") for h in args.heads)
    labels = {bench.head_label(h) for h in args.heads}
    assert len(labels) == len(args.heads) and "full full-rank" in labels


def test_sample_and_score_cost_runs_both_ways_on_a_tiny_base(tmp_path, gpt2_tokenizer, capsys):
    """The benchmark's two measurements on a tiny GPT-2 saved to disk: both tables, the two scorings' perplexity
    equal (it exits otherwise), and the sampled completions counted alike."""
    from .conftest import SHARED_DATA, load_benchmark, tiny_gpt2

    data = SHARED_DATA / "commongen" / "v1.1_LHRYANG"
    if not data.is_dir():
        import pytest

        pytest.skip(f"{data} is not present")
    tiny_gpt2(vocab_size=len(gpt2_tokenizer)).save_pretrained(tmp_path / "base")
    gpt2_tokenizer.save_pretrained(tmp_path / "base")
    bench = load_benchmark("sample_and_score_cost.py")
    argv = ["--data-dir", str(data), "--base", str(tmp_path / "base"), "--sets", "3", "--sample-sets", "2"]
    assert (
        bench.main([*argv, "--per-set", "3", "--max-new-tokens", "4", "--reps", "1", "--threads", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert "| LM head at completion positions |" in out and "| one prefill per distinct prompt |" in out
    assert out.count(" of 6 |") == 2  # 2 sets x 3 completions, the count shown on both rows
