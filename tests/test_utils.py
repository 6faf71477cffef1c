"""Atomic writes (dinado._utils): every writer leaves files and directories with the modes plain open() and
mkdir() would give under the current umask, and a failure part-way leaves neither the target nor a
temporary behind."""

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
