"""Compaction through Conv1d/3d, ConvTranspose, functional layers, timm's BatchNormAct2d and StdConv2d, r3d_18."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim import compact, structures, verify
from torchslim.layers import PaddedStdConv


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (1d, 2d, 3d, timm's), so eval mode is a real test."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _zero_compact_verify(model: nn.Module, x: torch.Tensor, every: int = 3) -> nn.Module:
    """Zero every ``every``-th group, compact, and check the smaller model on ``x`` and random inputs."""
    model = _randomize_norms(model).eval()
    groups = structures(model, x)
    assert groups, "no groups found"
    for g in groups[::every]:
        g.zero_()
    small = compact(model, x)
    assert _n_params(small) < _n_params(model)
    for seed in range(2):
        probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        assert verify(model, small, probe).ok
    return small


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 12, 3), nn.BatchNorm1d(12), nn.ReLU(),
                                  nn.Conv1d(12, 12, 3, groups=12), nn.ReLU(), nn.Conv1d(12, 8, 1), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(2))


class TransposeNet(nn.Module):
    """A decoder: two transposed convs and a 1x1 conv, with a BatchNorm between."""

    def __init__(self):
        super().__init__()
        self.up1, self.bn = nn.ConvTranspose2d(3, 10, 3, stride=2, padding=1, output_padding=1), nn.BatchNorm2d(10)
        self.up2, self.out = nn.ConvTranspose2d(10, 6, 2, stride=2), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.up2(torch.relu(self.bn(self.up1(x))))))


def test_conv1d_with_depthwise_and_batchnorm1d_compacts_exactly():
    small = _zero_compact_verify(Conv1dNet(), torch.randn(2, 2, 16))
    conv, dw = small.body[0], small.body[3]
    assert conv.out_channels == dw.in_channels == dw.groups == small.body[1].num_features < 12


def test_conv_transpose2d_compacts_exactly():
    small = _zero_compact_verify(TransposeNet(), torch.randn(2, 3, 5, 5))
    assert small.up1.out_channels == small.up2.in_channels == small.bn.num_features < 10
    assert small.up2.out_channels == small.out.in_channels < 6


def test_conv3d_and_transpose3d_compact_exactly():
    net = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU(), nn.MaxPool3d(2),
                        nn.ConvTranspose3d(8, 6, 2, stride=2), nn.ReLU(), nn.Conv3d(6, 2, 1))
    small = _zero_compact_verify(net, torch.randn(2, 2, 4, 6, 6))
    assert small[0].out_channels == small[4].in_channels < 8 and small[4].out_channels == small[6].in_channels < 6


class FunctionalNet(nn.Module):
    """Convs, BatchNorm and Linear written as functions of the module's own parameters."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3)
        self.w, self.b = nn.Parameter(torch.randn(5, 8) * 0.3), nn.Parameter(torch.randn(5))

    def forward(self, x):
        x = nn.functional.conv2d(x, self.c1.weight, self.c1.bias)
        x = nn.functional.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias)
        x = torch.relu(nn.functional.conv2d(torch.relu(x), self.c2.weight, self.c2.bias, padding=1))
        return nn.functional.linear(x.mean((2, 3)), self.w, self.b)


def test_functional_conv_batchnorm_and_linear_compact_exactly():
    small = _zero_compact_verify(FunctionalNet(), torch.randn(2, 3, 8, 8))
    assert small.c1.weight.shape[0] == small.bn.weight.shape[0] == small.c2.weight.shape[1] < 8
    assert small.w.shape[1] == small.c2.weight.shape[0] < 8


def test_timm_batchnorm_act2d_compacts_exactly():
    timm = pytest.importorskip("timm")
    net = nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8), nn.Conv2d(8, 4, 1))
    small = _zero_compact_verify(net, torch.randn(2, 3, 8, 8))
    assert small[1].num_features == small[0].out_channels < 8


@pytest.mark.parametrize("cls", ["StdConv2d", "ScaledStdConv2d"])
def test_weight_standardized_conv_loses_output_channels_exactly(cls):
    timm = pytest.importorskip("timm")
    std = getattr(timm.layers, cls)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), std(8, 12, 3), nn.ReLU(),
                        std(12, 12, 3, groups=12), nn.ReLU(), nn.Conv2d(12, 2, 1))
    small = _zero_compact_verify(net, torch.randn(2, 3, 8, 8))
    assert small[2].out_channels == small[4].groups == small[6].in_channels < 12
    assert small[0].out_channels == small[2].in_channels < 8     # silent channels and their zero columns
    assert isinstance(small[2], PaddedStdConv) and small[2].full == 8 * 9
    if cls == "ScaledStdConv2d":
        assert small[2].gain.shape[0] == small[2].out_channels


def test_a_weight_standardized_conv_keeps_a_silent_channel_whose_column_is_not_zero():
    timm = pytest.importorskip("timm")
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), timm.layers.ScaledStdConv2d(8, 6, 3), nn.ReLU(),
                        nn.Conv2d(6, 2, 1)).eval()
    with torch.no_grad():
        net[0].weight[:3] = 0
        net[0].bias[:3] = 0       # channels 0-2 silent; the standardized conv's columns for them are not zero
        net[2].weight[:, 2] = 0   # channel 2's column is
    small = compact(net, torch.randn(2, 3, 8, 8))
    assert small[0].out_channels == small[2].in_channels == 7
    assert verify(net, small, torch.randn(2, 3, 8, 8)).ok


def test_timm_regnetx_gains_groups_and_compacts_exactly():
    timm = pytest.importorskip("timm")
    model = timm.create_model("regnetx_002", num_classes=10)
    small = _zero_compact_verify(model, torch.randn(1, 3, 64, 64))
    assert _n_params(small) < 0.8 * _n_params(model)


def test_torchvision_r3d_18_compacts_exactly():
    video = pytest.importorskip("torchvision.models.video")
    model = video.r3d_18(num_classes=10)
    small = _zero_compact_verify(model, torch.randn(1, 3, 4, 32, 32))
    assert _n_params(small) < 0.8 * _n_params(model)
