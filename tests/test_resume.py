import pytest
import torch

import dinado
from dinado import Guide, SampleSet
from dinado.training import latest_checkpoint

from .conftest import tiny_gpt2


def _samples():
    g = torch.Generator().manual_seed(0)
    completions = [
        torch.randint(1, 40, (int(n),), generator=g).tolist() + [0]
        for n in torch.randint(1, 6, (64,), generator=g)
    ]
    labels = [float(3 in c) for c in completions]
    return SampleSet.from_token_ids([[0]] * 64, completions, labels)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("variant", ["dinado-soft", "dinado-merge"])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, variant):
    samples = _samples()
    kwargs = dict(max_steps=12, batch_size=16, seed=3)
    straight = Guide.create(tiny_gpt2(), variant)
    full = dinado.train(straight, samples, **kwargs)

    def stop_at_7(step, values):
        if step == 7:
            raise Interrupt

    first = Guide.create(tiny_gpt2(), variant)
    with pytest.raises(Interrupt):
        dinado.train(first, samples, checkpoint_dir=tmp_path, checkpoint_every=5, on_step=stop_at_7, **kwargs)
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"
    resumed = Guide.create(tiny_gpt2(), variant)
    report = dinado.train(
        resumed, samples, checkpoint_dir=tmp_path, checkpoint_every=5, resume=True, **kwargs
    )
    for name, param in straight.trainable_state().items():
        assert torch.equal(param, resumed.trainable_state()[name]), name
    assert report.loss == pytest.approx(full.loss, abs=1e-6) and len(report.loss) == 12
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-12"]  # only the latest is kept


def test_resume_refuses_a_checkpoint_of_another_variant(tmp_path):
    samples = _samples()
    dinado.train(Guide.create(tiny_gpt2(), "nado"), samples, max_steps=2, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="holds a nado guide, but a dinado-soft guide"):
        dinado.train(
            Guide.create(tiny_gpt2(), "dinado-soft"),
            samples,
            max_steps=4,
            checkpoint_dir=tmp_path,
            resume=True,
        )
