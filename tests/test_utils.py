"""dinado._utils. Atomic writes: every writer leaves files and directories with the modes plain open() and
mkdir() would give under the current umask, and a failure part-way leaves neither the target nor a
temporary behind. The training-loop helpers: AdamW, the learning-rate schedule, clipping, the causal LM loss."""

import math
import os
import stat
from pathlib import Path

import pytest
import torch

import dinado
from dinado import _utils as dio
from dinado.data import SampleSet

from .conftest import load_benchmark, tiny_gpt2

UMASKS = (0o022, 0o027)


@pytest.fixture(params=UMASKS, ids=lambda m: f"umask{m:03o}")
def umask(request):
    """Run the test under each umask; the process's umask is restored afterwards."""
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def plain_modes(where: Path) -> tuple[int, int]:
    """The modes a plain open() and a plain mkdir() give here, now."""
    f, d = where / "plain-open-probe", where / "plain-mkdir-probe"
    with open(f, "w") as handle:
        handle.write("x")
    d.mkdir()
    try:
        return mode(f), mode(d)
    finally:
        f.unlink()
        d.rmdir()


def assert_plain_tree(root: Path, file_mode: int, dir_mode: int) -> None:
    """``root`` and everything under it has the plain modes (and nothing in it is a leftover temporary)."""
    assert mode(root) == dir_mode, f"{root}: {mode(root):o} != {dir_mode:o}"
    for p in root.rglob("*"):
        want = dir_mode if p.is_dir() else file_mode
        assert mode(p) == want, f"{p}: {mode(p):o} != {want:o}"
        assert ".tmp" not in p.name, p


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class Boom(Exception):
    pass


# ------------------------------------------------------------------------------------------- the umask itself


def test_plain_modes_follow_the_umask(tmp_path, umask):
    file_mode, dir_mode = plain_modes(tmp_path)
    assert dio.current_umask() == umask
    assert dio.plain_file_mode() == file_mode == 0o666 & ~umask
    assert dio.plain_dir_mode() == dir_mode == 0o777 & ~umask
    assert os.umask(umask) == umask  # reading it did not change it


def test_umask_without_proc(tmp_path, umask, monkeypatch):
    monkeypatch.setattr(dio, "_PROC_STATUS", str(tmp_path / "no-such-file"))
    assert dio.current_umask() == umask
    assert os.umask(umask) == umask  # the set-and-restore fallback put it back


def test_umask_is_not_cached(tmp_path):
    old = os.umask(0o022)
    try:
        assert dio.plain_file_mode() == 0o644
        os.umask(0o077)
        assert dio.plain_file_mode() == 0o600 and dio.plain_dir_mode() == 0o700
    finally:
        os.umask(old)


# ------------------------------------------------------------------------------------------- atomic_file


def test_atomic_file_gives_the_plain_mode_and_replaces(tmp_path, umask):
    file_mode, _ = plain_modes(tmp_path)
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    with dio.atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and tmp.name.startswith(".")
        assert target.read_bytes() == b"old"  # nothing visible until the end
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == file_mode
    assert names(tmp_path) == ["out.bin"]


def test_atomic_file_keeps_the_suffix_and_is_unique(tmp_path):
    target = tmp_path / "curves.png"
    with dio.atomic_file(target) as a, dio.atomic_file(target) as b:
        assert a != b and a.suffix == b.suffix == ".png"
        a.write_bytes(b"a")
        b.write_bytes(b"b")
    assert target.read_bytes() == b"a"  # the outer one finished last
    assert names(tmp_path) == ["curves.png"]


@pytest.mark.parametrize("error", [Boom, KeyboardInterrupt])
def test_atomic_file_failure_leaves_nothing(tmp_path, error):
    with pytest.raises(error):
        with dio.atomic_file(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            raise error
    assert names(tmp_path) == []
    (tmp_path / "out.txt").write_text("old")
    with pytest.raises(error):
        with dio.atomic_file(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            raise error
    assert names(tmp_path) == ["out.txt"] and (tmp_path / "out.txt").read_text() == "old"


def test_atomic_file_writer_that_removed_its_temporary(tmp_path):
    with pytest.raises(Boom):
        with dio.atomic_file(tmp_path / "x") as tmp:
            tmp.unlink()
            raise Boom
    assert names(tmp_path) == []


def test_make_temp_dir(tmp_path, umask):
    _, dir_mode = plain_modes(tmp_path)
    a = dio.make_temp_dir(tmp_path / "model")
    b = dio.make_temp_dir(tmp_path / "model")
    assert a != b and a.parent == b.parent == tmp_path and a.name.startswith(".model.")
    assert mode(a) == mode(b) == dir_mode
    assert names(a) == []


def test_set_plain_modes(tmp_path, umask):
    file_mode, dir_mode = plain_modes(tmp_path)
    root = tmp_path / "built"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"x")
    (root / "sub" / "a.json").write_text("{}")
    os.chmod(root / "model.safetensors", 0o600)
    os.chmod(root / "sub" / "a.json", 0o777)
    os.chmod(root / "sub", 0o700)
    os.chmod(root, 0o700)
    outside = tmp_path / "outside"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    (root / "link").symlink_to(outside)
    dio.set_plain_modes(root)
    (root / "link").unlink()
    assert_plain_tree(root, file_mode, dir_mode)
    assert mode(outside) == 0o600  # a link's target is not touched


# ------------------------------------------------------------------------------------------- the writers


def test_atomic_write_text(tmp_path, umask):
    file_mode, _ = plain_modes(tmp_path)
    dio.atomic_write_text(tmp_path / "report.md", "# hi\n")
    assert (tmp_path / "report.md").read_text() == "# hi\n"
    assert mode(tmp_path / "report.md") == file_mode
    assert names(tmp_path) == ["report.md"]


def test_atomic_write_text_failure_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        dio.atomic_write_text(tmp_path / "report.md", None)
    assert names(tmp_path) == []


def _sample_set() -> SampleSet:
    return SampleSet.from_token_ids([[0, 1], [0]], [[3, 0], [4]], [1.0, 0.0])


def test_sampleset_save(tmp_path, umask):
    file_mode, _ = plain_modes(tmp_path)
    _sample_set().save(tmp_path / "samples.safetensors")
    assert mode(tmp_path / "samples.safetensors") == file_mode
    assert names(tmp_path) == ["samples.safetensors"]


def test_sampleset_save_failure_leaves_nothing(tmp_path, monkeypatch):
    import dinado.data

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(dinado.data, "save_file", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _sample_set().save(tmp_path / "samples.safetensors")
    assert names(tmp_path) == []


def test_guide_save_pretrained(tmp_path, umask):
    file_mode, dir_mode = plain_modes(tmp_path)
    dinado.Guide.create(tiny_gpt2(), "nado").save_pretrained(tmp_path / "guide")
    assert names(tmp_path / "guide") == ["dinado_config.json", "guide.safetensors"]
    assert_plain_tree(tmp_path / "guide", file_mode, dir_mode)


def test_guide_save_pretrained_failure_leaves_no_temporary(tmp_path, monkeypatch):
    import dinado.guide

    guide = dinado.Guide.create(tiny_gpt2(), "nado")
    guide.save_pretrained(tmp_path / "guide")
    before = (tmp_path / "guide" / "guide.safetensors").read_bytes()

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise Boom

    monkeypatch.setattr(dinado.guide, "save_file", half_then_fail)
    with pytest.raises(Boom):
        guide.save_pretrained(tmp_path / "guide")
    assert names(tmp_path / "guide") == ["dinado_config.json", "guide.safetensors"]
    assert (tmp_path / "guide" / "guide.safetensors").read_bytes() == before


RECORDS = [{"step": 1, "loss": 2.0, "regularizer": 0.1}, {"step": 2, "loss": 1.5, "regularizer": 0.2}]


def test_plot_training_curves(tmp_path, umask):
    from dinado.evaluation import plot_training_curves

    file_mode, _ = plain_modes(tmp_path)
    plot_training_curves(RECORDS, tmp_path / "training_curves.png")
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mode(tmp_path / "training_curves.png") == file_mode
    assert names(tmp_path) == ["training_curves.png"]


def test_plot_training_curves_failure_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from dinado.evaluation import plot_training_curves

    def half_then_fail(self, fname, **kwargs):
        Path(fname).write_bytes(b"half")
        raise Boom

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(Boom):
        plot_training_curves(RECORDS, tmp_path / "training_curves.png")
    assert names(tmp_path) == []


def test_checkpoint(tmp_path, umask):
    from dinado.training import TrainReport, _save_checkpoint

    file_mode, dir_mode = plain_modes(tmp_path)
    guide = dinado.Guide.create(tiny_gpt2(), "nado")
    optimizer = torch.optim.AdamW([p for p in guide.parameters() if p.requires_grad], lr=1e-3)
    _save_checkpoint(tmp_path / "ckpt", 3, guide, optimizer, TrainReport(variant="nado"))
    assert names(tmp_path / "ckpt") == ["checkpoint-3"]
    assert_plain_tree(tmp_path / "ckpt", file_mode, dir_mode)


def test_checkpoint_failure_leaves_nothing(tmp_path, monkeypatch):
    import dinado.training
    from dinado.training import TrainReport, _save_checkpoint

    guide = dinado.Guide.create(tiny_gpt2(), "nado")
    optimizer = torch.optim.AdamW([p for p in guide.parameters() if p.requires_grad], lr=1e-3)
    _save_checkpoint(tmp_path, 3, guide, optimizer, TrainReport(variant="nado"))

    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(dinado.training, "save_file", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        _save_checkpoint(tmp_path, 6, guide, optimizer, TrainReport(variant="nado"))
    assert names(tmp_path) == ["checkpoint-3"]  # the older checkpoint is kept, no partial one is left


def test_pretrain_output_directory(tmp_path, umask):
    from dinado.pretrain import PretrainConfig, pretrain

    file_mode, dir_mode = plain_modes(tmp_path)
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"the cat sat on mat number {i % 7}.\n" for i in range(64)))
    os.chmod(text, file_mode)
    config = PretrainConfig(
        text_file=str(text), vocab_size=300, n_layer=1, n_embd=32, n_head=2, context=32, batch_size=16,
        max_epochs=None, max_steps=2, eval_every=1,
    )  # fmt: skip
    pretrain(config, tmp_path / "runs" / "base", progress=False)
    assert names(tmp_path) == ["corpus.txt", "runs"]
    assert names(tmp_path / "runs") == ["base"]
    assert_plain_tree(tmp_path / "runs", file_mode, dir_mode)


def test_classifier_output_directory(tmp_path, umask):
    from dinado.classifier import train_classifier

    file_mode, dir_mode = plain_modes(tmp_path)
    texts = [f"{w} word {i}" for i in range(32) for w in ("sir", "dude")][:32]
    labels = ["formal" if t.startswith("sir") else "informal" for t in texts]
    train_classifier(
        texts, labels, tmp_path / "clf", label_names=("informal", "formal"), vocab_size=300, hidden_size=32,
        num_layers=1, num_heads=2, max_length=16, epochs=1, batch_size=16,
    )  # fmt: skip
    assert names(tmp_path) == ["clf"]
    assert_plain_tree(tmp_path / "clf", file_mode, dir_mode)


def _load_registered(name: str):
    """Import benchmarks/<name> registered in sys.modules (its dataclasses need their module there)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / name
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_exact_convergence_figure(tmp_path, umask):
    bench = _load_registered("exact_convergence.py")
    file_mode, _ = plain_modes(tmp_path)
    table = {"nado": {16: bench.Fit(0.5, 0.2, 1.0), 64: bench.Fit(0.3, 0.4, 1.0)}}
    bench.save_figure(tmp_path / "convergence.png", [16, 64], table, 1.0, 0.1, 5)
    assert mode(tmp_path / "convergence.png") == file_mode
    assert names(tmp_path) == ["convergence.png"]


COMMONGEN_RESULT = {
    "cells": [
        {"variant": v, "samples": arm, "per_set": n, "dev_success": 0.1 * n}
        for v in ("nado", "dinado-soft")
        for arm in ("p", "proposal+IS")
        for n in (1, 2)
    ],
    "base_dev_success": 0.05,
    "train_sets": 3,
}


def test_commongen_plot(tmp_path, umask):
    bench = load_benchmark("commongen", "run.py")
    file_mode, _ = plain_modes(tmp_path)
    bench.plot_efficiency(COMMONGEN_RESULT, tmp_path / "efficiency.png")
    assert mode(tmp_path / "efficiency.png") == file_mode
    assert names(tmp_path) == ["efficiency.png"]


def test_commongen_plot_failure_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    bench = load_benchmark("commongen", "run.py")

    def half_then_fail(self, fname, **kwargs):
        Path(fname).write_bytes(b"half")
        raise Boom

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    with pytest.raises(Boom):
        bench.plot_efficiency(COMMONGEN_RESULT, tmp_path / "efficiency.png")
    assert names(tmp_path) == []


# ------------------------------------------------------------------------------------------- atomic directories


def test_atomic_directory_renames_into_place_and_replaces_only_at_the_end(tmp_path, umask):
    file_mode, dir_mode = plain_modes(tmp_path)
    out = tmp_path / "a" / "b" / "out"
    with dio.atomic_directory(out) as tmp:
        assert tmp.parent == out.parent and tmp.name == f".out.partial-{os.getpid()}" and not out.exists()
        os.close(os.open(tmp / "weights", os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors writes
    assert names(out) == ["weights"] and names(out.parent) == ["out"]
    assert_plain_tree(tmp_path / "a", file_mode, dir_mode)
    with pytest.raises(FileExistsError, match="exists and is not empty; .*overwrite=True"):
        dio.check_output_dir(out, overwrite=False)
    with pytest.raises(Boom), dio.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("half")
        raise Boom
    assert names(out) == ["weights"] and names(out.parent) == ["out"]  # the old one is left as it was
    with dio.atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new").write_text("x")
        assert names(out) == ["weights"]  # replaced only once the new one is complete
    assert names(out) == ["new"] and names(out.parent) == ["out"]


def test_atomic_directory_failure_removes_the_parents_it_made(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(KeyboardInterrupt), dio.atomic_directory(tmp_path / "a" / "b" / "c" / "out") as tmp:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt
    assert names(tmp_path) == ["a"] and names(tmp_path / "a") == []  # "a" was there before: it stays


# ------------------------------------------------------------------------------------------- training loops


def test_lr_schedule_warms_up_linearly_then_decays():
    linear = dio.LRSchedule(lr=2.0, total=10, warmup=4, decay="linear")
    # warm-up: (step + 1) / (warmup + 1), reaching the full rate at step `warmup`
    assert [linear.factor(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    # then linear decay over the remaining total - warmup = 6 steps, to 0 at step `total`
    assert [linear.factor(s) for s in (5, 7, 9, 10, 11)] == pytest.approx([5 / 6, 0.5, 1 / 6, 0.0, 0.0])
    cosine = dio.LRSchedule(lr=2.0, total=10, warmup=4, decay="cosine")
    assert [cosine.factor(s) for s in (0, 3, 4, 7, 10)] == pytest.approx([0.2, 0.8, 1.0, 0.5, 0.0])
    assert cosine.factor(5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))
    constant = dio.LRSchedule(lr=2.0, total=10, warmup=4)
    assert [constant.factor(s) for s in (0, 4, 9)] == pytest.approx([0.2, 1.0, 1.0])
    assert dio.LRSchedule(lr=1.0, total=10).factor(0) == 1.0  # no warm-up, no decay: the rate as given
    # the three loops with a warm-up give it as a fraction of the steps, rounded down
    assert dio.LRSchedule.from_fraction(1e-3, 99, 0.05, "cosine").warmup == 4
    assert dio.LRSchedule.from_fraction(1e-3, 10, 0.05, "linear").warmup == 0
    optimizer = dio.adamw([torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))], 2.0)
    linear.apply(optimizer, 7)
    assert [g["lr"] for g in optimizer.param_groups] == [2.0 * linear.factor(7)]
    with pytest.raises(ValueError, match="decay must be one of"):
        dio.LRSchedule(lr=1.0, total=10, decay="step")


def test_adamw_decays_every_parameter_or_matrices_only():
    matrix, vector = torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))
    plain = dio.adamw([matrix, vector], 1e-3, 0.1)
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in plain.param_groups] == [(2, 0.1, 1e-3)]
    split = dio.adamw(iter([vector, matrix]), 1e-3, 0.1, matrices_only=True)
    groups = [(g["params"], g["weight_decay"]) for g in split.param_groups]
    assert groups == [([matrix], 0.1), ([vector], 0.0)]
    assert [g["eps"] for g in plain.param_groups] == [1e-8]  # torch's default unless asked
    assert [g["eps"] for g in dio.adamw([matrix], 1e-3, eps=1e-4, fused=True).param_groups] == [1e-4]


def test_trainable_parameters_and_clipping():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model[0].bias.requires_grad_(False)
    params = dio.trainable_parameters(model)
    assert params == [model[0].weight, model[1].weight, model[1].bias]

    def step(max_grad_norm):
        copy = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD(params, lr=1.0)
        loss = 100 * model(torch.ones(2, 3)).sum()
        dio.backward_step(optimizer, loss, params, max_grad_norm)
        norm = torch.cat([(copy[k] - v).flatten() for k, v in model.state_dict().items()]).norm()
        model.load_state_dict(copy)
        return float(norm)

    assert step(0.5) == pytest.approx(0.5)  # SGD with lr 1 moves by the clipped gradient
    assert step(None) > 10  # no clipping
    assert step(0.5) == pytest.approx(0.5)  # backward_step clears the gradients first: nothing accumulates


def test_causal_lm_loss_shifts_labels():
    model = tiny_gpt2()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = ids.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits
    picked = [
        logits[0, 0].log_softmax(-1)[2],
        logits[0, 1].log_softmax(-1)[3],
        logits[0, 2].log_softmax(-1)[4],
        logits[1, 0].log_softmax(-1)[6],
    ]
    expected = -torch.stack(picked)
    assert dio.causal_lm_loss(model, ids, mask, labels).item() == pytest.approx(
        expected.mean().item(), rel=1e-5
    )
    summed = dio.causal_lm_loss(model, ids, mask, labels, reduction="sum")
    assert summed.item() == pytest.approx(expected.sum().item(), rel=1e-5)
