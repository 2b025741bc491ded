"""A run whose loss or weights become NaN stops at once, keeps its last finite checkpoint, and resumes from it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from support import needs_fashion_mnist
from torch import nn

import torchslim.train.engine as engine
import torchslim.train.tasks as tasks
from torchslim.errors import ConfigError, DivergenceError
from torchslim.surgery.compact import compact, verify
from torchslim.train.checkpoint import load_checkpoint
from torchslim.train.loop import Regularizers, optimizer_step
from torchslim.train.recipes import load_recipe

TINY = [
    "data.train_limit=256", "data.test_limit=128", "eval_batch_size=128",
    "baseline.epochs=1", "baseline.lr=0.05", "ssl.epochs=1", "ssl.lr=0.05", "ssl.lr_schedule=constant",
    "finetune.epochs=1", "finetune.lr=0.01",
]


def tiny(*extra: str):
    return load_recipe("lenet_ssl", overrides=[*TINY, *extra])


def _all_finite(state_dict) -> bool:
    return all(bool(t.isfinite().all()) for t in state_dict.values() if t.is_floating_point())


# ---------------------------------------------------------------------------------------------
# the training step


def _tiny_step_setup():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), torch.randn(4, 3)


def test_a_nan_loss_raises_before_any_update():
    model, optimizer, x = _tiny_step_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DivergenceError, match=r"the training loss is nan.*grad_clip"):
        optimizer_step(model, optimizer, model(x).sum() * math.nan, rate=0.1)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_an_infinite_gradient_is_caught_by_clipping_before_the_update():
    model, optimizer, x = _tiny_step_setup()
    before = model.weight.detach().clone()
    model.weight.register_hook(lambda g: torch.full_like(g, math.inf))  # a finite loss, an overflowing gradient
    with pytest.raises(DivergenceError, match="the gradient norm is inf"):
        optimizer_step(model, optimizer, model(x).sum(), rate=0.1, regularizers=Regularizers(grad_clip=1.0))
    torch.testing.assert_close(model.weight.detach(), before)


# ---------------------------------------------------------------------------------------------
# compact() and verify() on weights a diverged run left


def test_compact_and_verify_say_plainly_that_the_weights_are_not_finite():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
        model[2].bias[1] = math.inf
    x = torch.randn(2, 4)
    with pytest.raises(DivergenceError, match=r"NaN or infinite weights \(0\.weight, 2\.bias\)") as err:
        compact(model, x)
    assert "please report" not in str(err.value)
    with pytest.raises(DivergenceError, match="the model to check has NaN or infinite weights"):
        verify(nn.Linear(4, 2), model[:1], x)


# ---------------------------------------------------------------------------------------------
# the engine


@needs_fashion_mnist
def test_a_diverging_phase_stops_keeps_the_last_finite_checkpoint_and_resumes(tmp_path, one_thread):
    with pytest.raises(DivergenceError) as err:
        engine.run(tiny("ssl.lr=1e3"), run_dir=tmp_path / "run", progress=False)
    message = str(err.value)
    assert message.startswith("ssl diverged in epoch 1/1, step ")
    assert "the training loss is nan" in message or "the training loss is inf" in message
    assert "ssl.lr" in message and "ssl.grad_clip" in message and "--resume" in message
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["phase"] == "baseline" and state["done"]["ssl"] == 0 and _all_finite(state["model"])
    assert not (tmp_path / "run" / "sparse.pt").exists()  # the phase model is not written either

    resumed = engine.run(tiny(), run_dir=tmp_path / "run", progress=False, resume=True)  # a sane ssl.lr
    straight = engine.run(tiny(), run_dir=tmp_path / "straight", progress=False)
    assert resumed.finished and resumed.epochs_trained == {"baseline": 0, "ssl": 1, "finetune": 1}
    assert resumed.accuracy == pytest.approx(straight.accuracy)


@pytest.mark.parametrize("when", ["loss", "weights"])
@needs_fashion_mnist
def test_divergence_in_the_middle_of_a_phase_never_overwrites_the_finite_checkpoint(tmp_path, monkeypatch,
                                                                                    one_thread, when):
    """Epoch 2 of the baseline diverges: through its loss (a NaN weight before its first step), or through
    weights its last step made infinite (no later loss to show it)."""
    real = tasks.train_epoch

    def diverges_in_epoch_2(model, *args, **kwargs):
        if kwargs["desc"].startswith("baseline 2/") and when == "loss":
            with torch.no_grad():
                model.conv1.weight[0, 0, 0, 0] = math.nan
        out = real(model, *args, **kwargs)
        if kwargs["desc"].startswith("baseline 2/") and when == "weights":
            with torch.no_grad():
                model.fc1.weight[0, 0] = math.inf
        return out

    monkeypatch.setattr(tasks, "train_epoch", diverges_in_epoch_2)
    recipe = tiny("baseline.epochs=2")
    with pytest.raises(DivergenceError, match=r"^baseline diverged in epoch 2/2, step \d+/\d+") as err:
        engine.run(recipe, run_dir=tmp_path, progress=False)
    what = "the training loss is nan" if when == "loss" else "the weights fc1.weight are not finite"
    assert what in str(err.value)
    assert "still holds the last finite state (after baseline epoch 1)" in str(err.value)
    assert "--allow-changed baseline.lr" in str(err.value)  # epoch 1 ran with the old rate
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["done"]["baseline"] == 1 and _all_finite(state["model"]) and state["optimizer"] is not None
    assert not (tmp_path / "baseline.pt").exists()

    monkeypatch.setattr(tasks, "train_epoch", real)
    lower = tiny("baseline.epochs=2", "baseline.lr=0.02")
    with pytest.raises(ConfigError, match="baseline.lr"):  # epoch 1 ran at 0.05: a plain --resume refuses
        engine.run(lower, run_dir=tmp_path, progress=False, resume=True, stop_after="baseline")
    result = engine.run(lower, run_dir=tmp_path, progress=False, resume=True, stop_after="baseline",
                        allow_changed=["baseline.lr"])
    assert result.epochs_trained["baseline"] == 1 and _all_finite(result.dense_model.state_dict())
    changes = json.loads((tmp_path / "results.json").read_text())["recipe_changes"]
    assert changes == [{"key": "baseline.lr", "values": [{"value": 0.05, "epochs": {"baseline": [1]}},
                                                          {"value": 0.02, "epochs": {"baseline": [2]}}]}]
