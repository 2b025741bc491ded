"""The model registry, and the contract every registered model keeps."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import ConfigError
from torchslim.models import CifarResNet, create_model, list_models, register_model


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _n_conv3x3(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())


IMAGE_CLASSIFIERS = [name for name in list_models() if name not in ("wordlm", "gpt")]  # LMs: tests/models/test_gpt.py


def test_registry_holds_the_papers_models() -> None:
    assert {"lenet", "mlp", "resnet20", "resnet32"} <= set(list_models())


@pytest.mark.parametrize("name", IMAGE_CLASSIFIERS)
def test_forward_backward_contract(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([3, 7])
    logits = model(x)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{pname}: bad gradient"


@pytest.mark.parametrize("name", IMAGE_CLASSIFIERS)
def test_symbolic_trace_matches_eager(name: str) -> None:
    model = create_model(name).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("name", IMAGE_CLASSIFIERS)
def test_arch_rebuilds_the_same_model(name: str) -> None:
    model = create_model(name, num_classes=7)
    arch = json.loads(json.dumps(model.arch))               # plain JSON survives a round trip
    assert arch["name"] == name and arch["kwargs"]["num_classes"] == 7
    twin = create_model(arch["name"], **arch["kwargs"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in twin.state_dict().items()}


def test_lenet_matches_caffe() -> None:
    model = create_model("lenet")
    # conv1 20*1*5*5+20, conv2 50*20*5*5+50, fc1 800*500+500, fc2 500*10+10
    assert _n_params(model) == 520 + 25_050 + 400_500 + 5_010 == 431_080
    assert [type(m) for m in model.children()] == [
        nn.Conv2d, nn.MaxPool2d, nn.Conv2d, nn.MaxPool2d, nn.Linear, nn.ReLU, nn.Linear,
    ]                                                       # no ReLU after the convolutions


def test_lenet_runs_after_its_layers_are_narrowed() -> None:
    model = create_model("lenet")
    model.conv2 = nn.Conv2d(20, 30, 5)                      # as if 20 filters were removed
    model.fc1 = nn.Linear(30 * 4 * 4, 100)
    model.fc2 = nn.Linear(100, 10)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_mlp_hidden_widths() -> None:
    model = create_model("mlp", hidden=(64, 32))
    assert [m.out_features for m in (model.fc1, model.fc2, model.fc3)] == [64, 32, 10]
    assert model.arch["kwargs"]["hidden"] == [64, 32]
    with pytest.raises(ConfigError, match="two layers"):
        create_model("mlp", hidden=(64,))


def test_resnet_structure() -> None:
    model = create_model("resnet20", in_channels=3)
    assert model.conv1.in_channels == 3
    assert sum(1 for m in model.modules() if type(m).__name__ == "BasicBlock") == 9
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    projection = model.layer2[0].shortcut
    assert isinstance(projection, nn.Sequential)
    assert projection[0].stride == (2, 2) and projection[0].kernel_size == (1, 1)
    assert isinstance(projection[1], nn.BatchNorm2d)
    assert model.fc.in_features == 64
    assert _n_conv3x3(model) + 1 == 20 and _n_conv3x3(create_model("resnet32")) + 1 == 32   # + fc


def test_resnet_rejects_a_bad_depth() -> None:
    with pytest.raises(ConfigError, match="6n\\+2"):
        CifarResNet(depth=21)


def test_unknown_name_suggests_a_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean 'resnet20'") as info:
        create_model("resnet_20")
    assert "lenet" in str(info.value)                        # and lists the registered names


def test_unknown_argument_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num_classes=10"):
        create_model("lenet", num_class=10)


def test_register_model_refuses_duplicates() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register_model("lenet")(nn.Identity)
