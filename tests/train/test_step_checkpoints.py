"""checkpoint_every_steps: a run killed inside an epoch resumes at its last step checkpoint and ends as if never
stopped, for images and for a word LM (whose hidden state the checkpoint carries)."""

from __future__ import annotations

import json

import pytest
from support import needs_fashion_mnist
from test_tasks import LM, _ptb

import torchslim.train.engine as engine
import torchslim.train.phases as phases
from torchslim.errors import CheckpointError
from torchslim.train.checkpoint import load_checkpoint, save_checkpoint
from torchslim.train.recipes import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = ["data.train_limit=512", "data.test_limit=128", "eval_batch_size=128", "baseline.epochs=1",
          "baseline.lr=0.05", "ssl.epochs=2", "ssl.lr=0.05", "ssl.kinds=[channel, shape]",
          "ssl.strength={channel: 0.1, shape: 0.1}", "ssl.keep=0.5", "ssl.keep_ramp=0.5", "finetune.epochs=1",
          "checkpoint_every_steps=3"]


def _killed_at(recipe, run_dir, phase: str, epoch: int, step: int, **kwargs) -> None:
    """Run ``recipe`` until the checkpoint inside ``phase`` epoch ``epoch`` (0-based) at ``step`` is written,
    then stop it as a kill would."""
    real = phases.save_run_checkpoint

    def then_killed(*args, partial=None, **kw):
        real(*args, partial=partial, **kw)
        if partial is not None and (partial["phase"], partial["epoch"], partial["progress"]["step"]) == \
                (phase, epoch, step):
            raise KeyboardInterrupt

    phases.save_run_checkpoint = then_killed
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.run(recipe, run_dir=run_dir, progress=False, **kwargs)
    finally:
        phases.save_run_checkpoint = real


def _numbers(run_dir) -> dict:
    saved = json.loads((run_dir / "results.json").read_text())
    history = [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in saved["history"]]
    return {"history": history, "accuracy": saved["accuracy"], "loss": saved["loss"]}


@needs_fashion_mnist
def test_an_image_run_killed_inside_an_epoch_ends_as_an_uninterrupted_one(tmp_path):
    recipe = load_recipe("lenet_ssl", overrides=IMAGES)
    engine.run(recipe, run_dir=tmp_path / "straight", progress=False)
    _killed_at(recipe, tmp_path / "killed", "ssl", 1, 6)  # epoch 2 of SSL, 6 of its 8 steps done
    state = load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    assert state["partial"]["progress"]["step"] == 6 and state["done"]["ssl"] == 1
    engine.run(recipe, run_dir=tmp_path / "killed", progress=False, resume=True)
    assert _numbers(tmp_path / "killed") == _numbers(tmp_path / "straight")


def test_a_word_lm_killed_inside_an_epoch_ends_as_an_uninterrupted_one(tmp_path):
    data = _ptb(tmp_path / "ptb", lines=300)
    recipe = load_recipe("kjv_lm_iss", overrides=[*LM, "baseline.epochs=1", "checkpoint_every_steps=4"])
    engine.run(recipe, data_dir=data, run_dir=tmp_path / "straight", progress=False)
    _killed_at(recipe, tmp_path / "killed", "baseline", 0, 8, data_dir=data)
    engine.run(recipe, data_dir=data, run_dir=tmp_path / "killed", progress=False, resume=True)
    assert _numbers(tmp_path / "killed") == _numbers(tmp_path / "straight")


@needs_fashion_mnist
def test_a_hand_edited_step_checkpoint_is_refused(tmp_path):
    recipe = load_recipe("lenet_ssl", overrides=IMAGES)
    _killed_at(recipe, tmp_path / "run", "baseline", 0, 3)
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    state["partial"]["progress"]["step"] = -1
    save_checkpoint(path, state)
    with pytest.raises(CheckpointError, match="partial"):
        engine.run(recipe, run_dir=tmp_path / "run", progress=False, resume=True)
