"""save_compact / load_compact round trips without pickle; ONNX and TorchScript exports match PyTorch."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from torchslim.deploy.serialize import export_onnx, export_torchscript, load_compact, save_compact
from torchslim.errors import CheckpointError, TorchSlimError, VerificationError
from torchslim.layers import LoweredConv2d


class Block(nn.Module):
    """A user container: its children are described one by one, the class comes from the skeleton."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.act(self.conv(x)))


class SmallCNN(nn.Module):
    """(B, 1, 12, 12) -> conv 5x5 -> 8x8 -> BN, ReLU, pool -> 4x4 -> conv 3x3 -> (B, 16*4*4) -> (B, classes)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 5), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block = Block(8, 16)
        self.fc = nn.Linear(16 * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.block(self.features(x)), 1))


class OtherNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv1(x).mean((2, 3)))


KEEP = torch.tensor([0, 1, 2, 4, 5, 7])  # conv1 filters kept: 6 of 8
KEEP2 = torch.arange(12)  # conv2 filters kept: 12 of 16
COLUMNS = torch.arange(0, 6 * 9, 2)  # live columns of conv2's lowered weight: 27 of 54


def _compact_by_hand(dense: SmallCNN) -> SmallCNN:
    """What compaction emits: narrower layers, a cropped 4x4 conv, a LoweredConv2d and an Identity."""
    model = SmallCNN()
    model.load_state_dict(dense.state_dict())
    conv1 = nn.Conv2d(1, 6, 4)  # the 5x5 kernel without its first row and column
    conv1.weight.data = dense.features[0].weight.data[KEEP, :, 1:, 1:].clone()
    conv1.bias.data = dense.features[0].bias.data[KEEP].clone()
    model.features[0] = nn.Sequential(nn.ZeroPad2d((-1, 0, -1, 0)), conv1)
    bn = nn.BatchNorm2d(6)
    for key, value in dense.features[1].state_dict().items():
        getattr(bn, key).data = value[KEEP].clone() if value.dim() else value.clone()
    model.features[1] = bn
    conv2 = nn.Conv2d(6, 12, 3, padding=1)
    conv2.weight.data = dense.block.conv.weight.data[KEEP2][:, KEEP].clone()
    conv2.bias.data = dense.block.conv.bias.data[KEEP2].clone()
    model.block.conv = LoweredConv2d.from_conv(conv2, COLUMNS)
    model.block.drop = nn.Identity()
    fc = nn.Linear(12 * 16, 10)
    fc.weight.data = dense.fc.weight.data.view(10, 16, 16)[:, KEEP2].reshape(10, -1).clone()
    fc.bias.data = dense.fc.bias.data.clone()
    model.fc = fc
    return model.eval()


@pytest.fixture
def compact() -> SmallCNN:
    torch.manual_seed(0)
    dense = SmallCNN()
    dense.features[1].running_mean.uniform_(-0.5, 0.5)
    dense.features[1].running_var.uniform_(0.5, 2.0)
    return _compact_by_hand(dense)


@pytest.fixture
def x() -> Tensor:
    return torch.randn(2, 1, 12, 12, generator=torch.Generator().manual_seed(1))


def test_round_trip_gives_identical_outputs(compact: SmallCNN, x: Tensor, tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    save_compact(compact, path)
    fresh = SmallCNN()
    loaded = load_compact(path, model=fresh)
    assert not loaded.training
    assert isinstance(fresh.features[0], nn.Conv2d) and isinstance(fresh.block.drop, nn.Dropout)  # untouched
    assert isinstance(loaded.block, Block)
    assert loaded.features[0][0].padding == (-1, 0, -1, 0)
    assert isinstance(loaded.block.conv, LoweredConv2d) and torch.equal(loaded.block.conv.columns, COLUMNS)
    assert isinstance(loaded.block.drop, nn.Identity)
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))
    assert [p.name for p in tmp_path.iterdir()] == ["small.pt"]  # no temporary file left behind


def test_file_is_plain_data_with_top_most_spec(compact: SmallCNN, tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    save_compact(compact, path, arch={"name": "smallcnn", "kwargs": {"classes": 10}})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "torchslim.compact" and ckpt["version"] == 1
    assert json.loads(ckpt["arch"]) == {"name": "smallcnn", "kwargs": {"classes": 10}}
    spec = json.loads(ckpt["spec"])
    attrs = spec.pop("__attrs__", {})  # plain settings of the undescribed modules (the user's own classes)
    assert attrs["features.3"]["kernel_size"] == 2 and not set(attrs) & set(spec), attrs  # e.g. the MaxPool2d
    assert set(spec) == {"features.0", "features.1", "features.2", "block.conv", "block.act", "block.drop", "fc"}
    assert [c["type"] for c in spec["features.0"]["children"]] == ["ZeroPad2d", "Conv2d"]
    assert spec["block.conv"] == {
        "type": "LoweredConv2d",
        "args": {"in_channels": 6, "out_channels": 12, "kernel_size": [3, 3], "stride": [1, 1],
                 "padding": [1, 1], "dilation": [1, 1], "bias": True, "num_columns": 27},
    }
    assert spec["features.1"]["args"]["num_features"] == 6
    assert spec["fc"]["args"] == {"in_features": 192, "out_features": 10, "bias": True}


def test_load_from_stored_arch(compact: SmallCNN, x: Tensor, tmp_path: Path, monkeypatch) -> None:
    calls = []

    def create_model(name: str, **kwargs) -> nn.Module:
        calls.append((name, kwargs))
        return SmallCNN(**kwargs)

    monkeypatch.setitem(sys.modules, "torchslim.models", types.SimpleNamespace(create_model=create_model))
    compact.arch = {"name": "smallcnn", "kwargs": {"classes": 10}}  # the default for arch=
    save_compact(compact, tmp_path / "small.pt")
    loaded = load_compact(tmp_path / "small.pt")
    assert calls and all(c == ("smallcnn", {"classes": 10}) for c in calls)  # on the meta device, then for real
    with torch.no_grad():
        assert torch.equal(loaded(x), compact(x))


def test_no_skeleton_asks_for_model(compact: SmallCNN, tmp_path: Path) -> None:
    save_compact(compact, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="model="):
        load_compact(tmp_path / "small.pt")


def test_corrupt_and_truncated_files_raise(compact: SmallCNN, tmp_path: Path) -> None:
    path = tmp_path / "small.pt"
    save_compact(compact, path)
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.pt").write_bytes(bytes(range(256)) * 64)
    for name in ("truncated.pt", "corrupt.pt"):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_compact(tmp_path / name, model=SmallCNN())


def test_foreign_files_raise(compact: SmallCNN, tmp_path: Path) -> None:
    torch.save(SmallCNN().state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a torchslim compact checkpoint"):
        load_compact(tmp_path / "plain.pt", model=SmallCNN())
    bad = {"format": "torchslim.compact", "version": 1, "arch": None, "state_dict": {},
           "spec": json.dumps({"fc": {"type": "Evil", "args": {}}})}
    torch.save(bad, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="'Evil'"):
        load_compact(tmp_path / "evil.pt", model=SmallCNN())


def test_file_for_another_model_raises(compact: SmallCNN, tmp_path: Path) -> None:
    save_compact(compact, tmp_path / "small.pt")
    with pytest.raises(CheckpointError, match="another model"):
        load_compact(tmp_path / "small.pt", model=OtherNet())  # no module 'features.0'
    wider = SmallCNN()
    wider.head = nn.PReLU()  # a parametrized module the file knows nothing about
    with pytest.raises(CheckpointError, match="missing keys: head.weight"):
        load_compact(tmp_path / "small.pt", model=wider)


def test_onnx_export_matches_onnxruntime(compact: SmallCNN, x: Tensor, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    path = tmp_path / "small.onnx"
    assert export_onnx(compact, x, path) <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["small.onnx"]  # weights inside, one file
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    (y5,) = session.run(None, {session.get_inputs()[0].name: x5.numpy()})  # batch is dynamic
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y5), compact(x5), rtol=1e-4, atol=1e-4)
    assert not compact.training


def test_onnx_export_without_dependencies_says_what_to_install(compact: SmallCNN, x: Tensor, tmp_path: Path,
                                                               monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(TorchSlimError, match=r"pip install torchslim\[export\]"):
        export_onnx(compact, x, tmp_path / "small.onnx")


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_round_trip(compact: SmallCNN, x: Tensor, tmp_path: Path) -> None:
    compact.train()
    assert export_torchscript(compact, x, tmp_path / "small.ts") <= 1e-5
    assert compact.training  # flags restored
    scripted = torch.jit.load(str(tmp_path / "small.ts"))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), compact.eval()(x), rtol=0, atol=1e-5)


class Noisy(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x + torch.rand_like(x)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_export_that_computes_something_else_raises(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.raises(VerificationError, match="differs from the model"):
        export_torchscript(Noisy(), torch.zeros(2, 64), tmp_path / "noisy.ts")
