"""Atomic checkpoint writes, weights-only loads, and errors that say what is wrong."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim.train.checkpoint as checkpoint
from torchslim.errors import CheckpointError
from torchslim.models import create_model
from torchslim.train.checkpoint import (
    load_checkpoint,
    load_optimizer_state_checked,
    load_state_dict_checked,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from torchslim.train.loop import sgd
from torchslim.train.recipes import PhaseSpec


def _trained_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = create_model("mlp", hidden=(8, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(3, 1, 28, 28)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "arch": model.arch,
        "epoch": 3,
        "best_acc": 0.91,
        "note": None,
        "history": [1.0, 0.5],
        "done": False,
    }


def _assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip(tmp_path: Path) -> None:
    state = _trained_state()
    path = tmp_path / "runs" / "ckpt.pt"                    # missing parent folders are created
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)
    assert "format" not in loaded and "version" not in loaded
    raw = torch.load(path, weights_only=True)               # the marker is in the file
    assert raw["format"] == "torchslim.train.checkpoint" and raw["version"] == 1


def test_overwrite_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1})
    save_checkpoint(path, {"epoch": 2})
    assert load_checkpoint(path)["epoch"] == 2
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"epoch": 1, "w": torch.ones(3)})
    before = path.read_bytes()

    def crash_midway(obj: object, f: object, *args: object, **kwargs: object) -> None:
        f.write(b"PK\x03\x04 half a zip file")              # part of the new checkpoint reaches disk
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", crash_midway)
    with pytest.raises(CheckpointError, match="unchanged"):
        save_checkpoint(path, {"epoch": 2, "w": torch.zeros(3)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]              # the temporary file is cleaned up
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("keep", [0, 10, 0.5, 0.9])
def test_truncated_file(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, _trained_state())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match="is truncated or corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "--resume" in str(info.value)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    gen = torch.Generator().manual_seed(0)
    path.write_bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="Delete it to start fresh"):
        load_checkpoint(path)


def test_torch_file_without_marker(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a torchslim checkpoint"):
        load_checkpoint(path)


def test_pickled_objects_are_refused_on_load(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"format": "torchslim.train.checkpoint", "version": 1, "model": nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError, match=r"pickled Python object \(torch.nn.modules.linear.Linear\)"):
        load_checkpoint(path)


def test_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"format": "torchslim.train.checkpoint", "version": 2}, path)
    with pytest.raises(CheckpointError, match="Upgrade torchslim"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"model": nn.Linear(2, 2)}, r"state\['model'\] is a Linear"),
        ({"cfg": {"path": Path("x")}}, r"state\['cfg'\]\['path'\]"),
        ({"version": 3}, "reserved"),
    ],
)
def test_unloadable_state_is_refused_on_save(tmp_path: Path, state: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        save_checkpoint(tmp_path / "ckpt.pt", state)
    assert not (tmp_path / "ckpt.pt").exists()


def test_matching_state_dict_loads() -> None:
    source, target = create_model("lenet"), create_model("lenet")
    load_state_dict_checked(target, source.state_dict())
    assert torch.equal(target.fc2.weight, source.fc2.weight)


def test_mismatched_model_names_keys_and_shapes() -> None:
    source = create_model("mlp", hidden=(64, 32))
    target = create_model("lenet")
    before = target.fc1.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_state_dict_checked(target, source.state_dict())
    message = str(info.value)
    assert "conv1.weight" in message                         # missing from the checkpoint
    assert "fc3.weight" in message                           # unexpected in the checkpoint
    assert "fc1.weight: checkpoint (64, 784) vs model (500, 800)" in message
    assert torch.equal(target.fc1.weight, before)           # nothing was half-loaded


def test_ddp_prefix_is_pointed_out() -> None:
    model = create_model("lenet")
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="strip that prefix"):
        load_state_dict_checked(model, wrapped)


def test_rng_state_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(123)
    save_checkpoint(tmp_path / "ckpt.pt", {"rng": rng_state()})
    expected = torch.rand(5)
    torch.manual_seed(999)
    set_rng_state(load_checkpoint(tmp_path / "ckpt.pt")["rng"])
    torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_rng_state_of_a_generator() -> None:
    gen = torch.Generator().manual_seed(7)
    state = rng_state(gen)
    expected = torch.rand(4, generator=gen)
    set_rng_state(state, gen)
    torch.testing.assert_close(torch.rand(4, generator=gen), expected, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="uint8 tensor under 'torch'"):
        set_rng_state({"torch": [1, 2]})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_an_optimizer_state_is_checked_before_it_is_loaded(optimizer):
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    first = sgd(model, PhaseSpec(optimizer=optimizer, lr=0.1))
    model(torch.randn(2, 3)).sum().backward()
    first.step()
    saved = first.state_dict()
    fresh = sgd(model, PhaseSpec(optimizer=optimizer, lr=0.5))
    load_optimizer_state_checked(fresh, saved)  # a state of this optimizer loads as it would
    assert fresh.param_groups[0]["lr"] == 0.1 and len(fresh.state) == len(first.state)
    key = "momentum" if optimizer == "sgd" else "betas"
    bad = {**saved, "param_groups": [{**saved["param_groups"][0], key: "0.9"}, *saved["param_groups"][1:]]}
    untouched = sgd(model, PhaseSpec(optimizer=optimizer, lr=0.5))
    with pytest.raises(CheckpointError, match=rf"opt\.param_groups\[0\]\['{key}'\] is '0.9'"):
        load_optimizer_state_checked(untouched, bad, "opt")
    assert untouched.param_groups[0]["lr"] == 0.5 and not untouched.state
