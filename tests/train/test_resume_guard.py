"""A resume continues the run it resumes, or refuses: changed recipe values, hand-edited checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support import needs_fashion_mnist

import torchslim.train.engine as engine
import torchslim.train.tasks as tasks
from torchslim.cli import main
from torchslim.errors import CheckpointError, ConfigError
from torchslim.train.recipes import load_recipe

TINY = [
    "data.train_limit=256", "data.test_limit=128", "eval_batch_size=128",
    "baseline.epochs=2", "baseline.lr=0.05", "ssl.epochs=2", "ssl.lr=0.05", "ssl.lr_schedule=constant",
    "ssl.kinds=[channel, shape]", "ssl.strength={channel: 0.04, shape: 0.04}",
    "finetune.epochs=1", "finetune.lr=0.01",
]

pytestmark = [needs_fashion_mnist, pytest.mark.usefixtures("one_thread")]


def tiny(*extra: str):
    return load_recipe("lenet_ssl", overrides=[*TINY, *extra])


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run folder whose checkpoint was taken after baseline epoch 1 of 2 (with the optimizer's state)."""
    path, threads = tmp_path_factory.mktemp("interrupted"), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        interrupt(tiny(), path, "baseline 2/")
    finally:
        torch.set_num_threads(threads)
    return path


def interrupt(recipe, run_dir, epoch: str) -> None:
    """Run ``recipe`` in ``run_dir`` until the epoch whose description starts with ``epoch`` ("ssl 2/"), killed."""
    real = tasks.train_epoch

    def stops_there(*args, **kwargs):
        if kwargs["desc"].startswith(epoch):
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    tasks.train_epoch = stops_there
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.run(recipe, run_dir=run_dir, progress=False)
    finally:
        tasks.train_epoch = real


@pytest.fixture
def run_dir(tmp_path, interrupted):
    shutil.copytree(interrupted, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------------------------------------
# changed recipe values


def test_a_value_the_finished_epochs_used_is_refused_with_the_ways_out(run_dir):
    before = (run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigError) as err:
        engine.run(tiny("baseline.lr=0.1", "batch_size=32"), run_dir=run_dir, progress=False, resume=True)
    message = str(err.value)
    assert "baseline.lr: 0.05 → 0.1" in message and "batch_size: 64 → 32" in message
    assert f"--from {run_dir}" in message and "--out <new folder>" in message
    assert "--allow-changed baseline.lr batch_size" in message
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_values_no_finished_epoch_used_may_change(run_dir):
    result = engine.run(tiny("ssl.lr=0.02", "finetune.epochs=3", "eval_batch_size=64"), run_dir=run_dir,
                        progress=False, resume=True, stop_after="baseline")
    assert result.epochs_trained["baseline"] == 1
    assert "recipe_changes" not in json.loads((run_dir / "results.json").read_text())


def test_allowed_changes_are_recorded_per_epoch_in_results_json(tmp_path):
    """ssl.strength changes after ssl epoch 1 of 2: results.json says which epoch ran with which λ."""
    run_dir = tmp_path
    interrupt(tiny("baseline.epochs=1"), run_dir, "ssl 2/")
    stronger = tiny("baseline.epochs=1", "ssl.strength={channel: 0.08, shape: 0.08}")
    with pytest.raises(ConfigError, match=r"ssl\.strength"):
        engine.run(stronger, run_dir=run_dir, progress=False, resume=True)
    result = engine.run(stronger, run_dir=run_dir, progress=False, resume=True, stop_after="ssl",
                        allow_changed=["ssl.strength"])
    assert result.epochs_trained["ssl"] == 1
    expected = [{"key": "ssl.strength", "values": [
        {"value": {"channel": 0.04, "shape": 0.04}, "epochs": {"ssl": [1]}},
        {"value": {"channel": 0.08, "shape": 0.08}, "epochs": {"ssl": [2]}}]}]
    assert json.loads((run_dir / "results.json").read_text())["recipe_changes"] == expected
    engine.run(stronger, run_dir=run_dir, progress=False, resume=True, stop_after="ssl")  # nothing left to train
    assert json.loads((run_dir / "results.json").read_text())["recipe_changes"] == expected  # kept by the checkpoint


def test_allow_changed_needs_resume(tmp_path):
    with pytest.raises(ConfigError, match="add --resume"):
        engine.run(tiny(), run_dir=tmp_path, progress=False, allow_changed=["ssl.lr"])


def test_the_command_line_refuses_and_allows(run_dir, capsys):
    argv = ["train", "lenet_ssl", "--out", str(run_dir), "--resume", "--no-progress", "--stop-after", "baseline",
            *[f"--set={o}" for o in TINY], "--set", "baseline.momentum=0.5"]
    assert main(argv) == 2
    assert "baseline.momentum: 0.9 → 0.5" in capsys.readouterr().err
    assert main([*argv, "--allow-changed", "baseline.momentum"]) == 0
    changes = json.loads((run_dir / "results.json").read_text())["recipe_changes"]
    assert changes[0]["key"] == "baseline.momentum" and changes[0]["values"][1]["epochs"] == {"baseline": [2]}


# ---------------------------------------------------------------------------------------------
# hand-edited or damaged checkpoints


def _edit_done_list(s):
    s["done"] = [1, 0, 0]


def _edit_done_retrains(s):
    s["done"]["baseline"] = 0  # history still records baseline epoch 1: it would be trained again


def _edit_done_str(s):
    s["done"]["baseline"] = "1"


def _edit_history_str(s):
    s["history"] = "epoch 1"


def _edit_record_epoch(s):
    s["history"][0]["epoch"] = "1"


def _edit_record_field(s):
    s["history"][0]["note"] = "hand-written"


def _edit_phase(s):
    s["phase"] = "warmup"


def _edit_accuracy(s):
    s["accuracy"] = {"baseline": "high"}


def _edit_optimizer_str(s):
    s["optimizer"] = "sgd"


def _edit_optimizer_lr(s):
    s["optimizer"]["param_groups"][0]["lr"] = "fast"


def _edit_optimizer_momentum(s):
    s["optimizer"]["param_groups"][0]["momentum"] = -0.9


def _edit_optimizer_params(s):
    s["optimizer"]["param_groups"][0]["params"] = [0, 1]


def _edit_optimizer_buffer(s):
    s["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3)


def _edit_optimizer_nan(s):
    s["optimizer"]["state"][0]["momentum_buffer"].fill_(float("nan"))


@pytest.mark.parametrize("edit, field", [
    (_edit_done_list, ": done is not"),
    (_edit_done_retrains, ": done['baseline'] is not the number of baseline epochs in history (1"),
    (_edit_done_str, ": done is not"),
    (_edit_history_str, ": history is not"),
    (_edit_record_epoch, ": history[0]['epoch'] is not"),
    (_edit_record_field, ": history[0] is not an epoch record (unknown fields ['note'])"),
    (_edit_phase, ": phase is not"),
    (_edit_accuracy, ": accuracy is not"),
    (_edit_optimizer_str, ": optimizer is not"),
    (_edit_optimizer_lr, "optimizer.param_groups[0]['lr'] is 'fast'"),
    (_edit_optimizer_momentum, "optimizer.param_groups[0]['momentum'] is -0.9"),
    (_edit_optimizer_params, "optimizer.param_groups[0]['params']"),
    (_edit_optimizer_buffer, "optimizer.state[0]['momentum_buffer'] has shape (3,)"),
    (_edit_optimizer_nan, "optimizer.state[0]['momentum_buffer'] holds NaN"),
], ids=lambda v: v.__name__[6:] if callable(v) else None)
def test_a_hand_edited_checkpoint_is_a_checkpoint_error_naming_the_field(run_dir, edit, field):
    path = run_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="edited or damaged") as err:
        engine.run(tiny(), run_dir=run_dir, progress=False, resume=True)
    assert field in str(err.value)
    assert json.loads(json.dumps(sorted(p.name for p in run_dir.iterdir()))) == ["checkpoint.pt"]  # nothing ran


def test_a_branch_from_an_edited_checkpoint_names_the_field(tmp_path, run_dir):
    engine.run(tiny(), run_dir=run_dir, progress=False, resume=True, stop_after="baseline")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    _edit_done_list(state)
    torch.save(state, run_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=": done is not"):
        engine.run(tiny("ssl.lr=0.02"), run_dir=tmp_path / "branch", progress=False, branch_from=run_dir)
