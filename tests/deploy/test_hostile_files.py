"""load_compact refuses hostile or damaged files before they cost memory, naming the entry at fault."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from torchslim.deploy.serialize import load_compact, save_compact
from torchslim.errors import CheckpointError
from torchslim.models import create_model

LIMIT = 2_000_000  # elements: far above a LeNet layer (800·500 = 400k), far below the hostile ones


class NoBigAllocation(TorchDispatchMode):
    """Fails the test at the first request for a real (non-meta) tensor of more than LIMIT elements,
    before the allocation happens."""

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        factory = "empty" in name or name in ("zeros", "ones", "full", "new_zeros", "new_ones", "new_full")
        sizes = [a for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(n, int) for n in a)]
        if factory and str(kwargs.get("device", "cpu")) != "meta" and any(math.prod(s) > LIMIT for s in sizes):
            raise AssertionError(f"{func} allocates {sizes} before the file was checked")
        return func(*args, **kwargs)


@pytest.fixture
def lenet_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("lenet")  # conv1, conv2, fc1 (800 -> 500), fc2 (500 -> 10); model.arch is stored
    path = tmp_path / "lenet.pt"
    save_compact(model, path)
    return path


def _tamper(path: Path, edit: Callable[[dict, dict], None]) -> Path:
    """Rewrite ``path`` with ``edit(ckpt, spec)`` applied (``spec`` is the parsed JSON, written back)."""
    ckpt = torch.load(path, weights_only=True)
    spec = json.loads(ckpt["spec"])
    edit(ckpt, spec)
    ckpt["spec"] = json.dumps(spec)
    out = path.with_name("tampered.pt")
    torch.save(ckpt, out)
    return out


def _load(path: Path) -> nn.Module:
    with NoBigAllocation():
        return load_compact(path)


def test_untouched_file_loads_within_the_allocation_guard(lenet_file: Path) -> None:
    assert isinstance(_load(lenet_file), nn.Module)


def test_huge_layer_declared_in_spec_is_refused_before_allocation(lenet_file: Path) -> None:
    def edit(ckpt: dict, spec: dict) -> None:
        spec["fc2"]["args"].update(in_features=25000, out_features=25000)

    with pytest.raises(CheckpointError, match=r"module 'fc2' \(Linear\).*\(25000, 25000\).*\(10, 500\)"):
        _load(_tamper(lenet_file, edit))


def test_expanded_view_claiming_more_than_the_file_holds_is_refused(lenet_file: Path) -> None:
    def edit(ckpt: dict, spec: dict) -> None:
        spec["fc2"]["args"].update(in_features=4000, out_features=4000)
        ckpt["state_dict"]["fc2.weight"] = torch.zeros(1).expand(4000, 4000)  # 4 bytes stored, 64 MB claimed
        ckpt["state_dict"]["fc2.bias"] = torch.zeros(4000)

    with pytest.raises(CheckpointError, match="claim .* bytes but the file holds"):
        _load(_tamper(lenet_file, edit))


@pytest.mark.parametrize(("key", "value", "wanted"), [
    ("in_features", -5, "an int >= 0"),
    ("in_features", "500", "an int >= 0"),
    ("in_features", 500.0, "an int >= 0"),
    ("bias", 1, "true or false"),
])
def test_bad_argument_types_and_ranges_name_the_entry(lenet_file: Path, key: str, value: Any, wanted: str) -> None:
    def edit(ckpt: dict, spec: dict) -> None:
        spec["fc2"]["args"][key] = value

    with pytest.raises(CheckpointError, match=rf"module 'fc2' \(Linear\) has {key}=.*must be {wanted}"):
        _load(_tamper(lenet_file, edit))


def test_nan_and_unknown_arguments_are_refused(lenet_file: Path, tmp_path: Path) -> None:
    ckpt = torch.load(lenet_file, weights_only=True)
    ckpt["spec"] = ckpt["spec"].replace('"bias": true}', '"bias": true, "eps": NaN}', 1)  # json writes NaN
    torch.save(ckpt, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="eps=nan; it must be a finite number"):
        _load(tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="unknown argument 'evil'"):
        _load(_tamper(lenet_file, lambda c, s: s["fc1"]["args"].update(evil=1)))


def test_unknown_tied_names_are_refused(lenet_file: Path) -> None:
    def edit(ckpt: dict, spec: dict) -> None:
        spec["__tied__"] = [["fc2.weight", "decoder.weight"]]

    with pytest.raises(CheckpointError, match=r"names \['decoder.weight'\]"):
        _load(_tamper(lenet_file, edit))


@pytest.mark.parametrize(("value", "match"), [
    (10**8, "builds a dense model of .* MiB"),  # fc2 alone would be 500 x 1e8 floats
    (-3, "num_classes=-3"),
    ("10", "num_classes='10'"),
    (True, "num_classes=True"),
])
def test_arch_keywords_are_checked_before_the_skeleton_is_built(lenet_file: Path, value: Any, match: str) -> None:
    def edit(ckpt: dict, spec: dict) -> None:
        ckpt["arch"] = json.dumps({"name": "lenet", "kwargs": {"num_classes": value}})

    with pytest.raises(CheckpointError, match=match):
        _load(_tamper(lenet_file, edit))


class _Code:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo never",))


def test_pickled_code_is_called_code_not_truncation(tmp_path: Path) -> None:
    torch.save({"format": "torchslim.compact", "payload": _Code()}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match=r"holds pickled Python objects \(code: (posix|nt)\.system\)") as err:
        load_compact(tmp_path / "code.pt")
    assert "truncated" not in str(err.value)


def test_save_compact_honours_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        save_compact(nn.Linear(2, 2), tmp_path / "linear.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "linear.pt").stat().st_mode & 0o777 == 0o640  # 0o666 less the umask, as open() gives
