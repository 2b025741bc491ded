"""Layer rules: Conv1d/3d and ConvTranspose as layers; F.conv/F.linear/F.batch_norm on a module's parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import UnsupportedOperation, structures
from torchslim.errors import UnknownOpWarning


def _stripes(groups, param):
    """``{(dim, role)}`` of every stripe on ``param`` among ``groups``."""
    return {(s.dim, s.role) for g in groups for s in g.family.stripes if s.param == param}


class FunctionalConvBN(nn.Module):
    """A conv and a BatchNorm written with their functional forms on the module's own parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)   # its weight only: the call is F.conv2d in this forward
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.conv2d(x, self.conv.weight, self.conv.bias)
        x = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias, False)
        x = F.relu(x).mean((2, 3))
        return F.linear(x, self.head.weight, self.head.bias)


def test_functional_forms_are_the_same_op_as_their_modules():
    groups = structures(FunctionalConvBN(), torch.randn(1, 3, 8, 8), strict=True)
    assert len(groups) == 8
    assert _stripes(groups, "conv.weight") == {(0, "out")}
    assert _stripes(groups, "bn.weight") == {(0, "out")} and _stripes(groups, "bn.running_var") == {(0, "state")}
    assert _stripes(groups, "head.weight") == {(1, "in")}


class FunctionalMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 6)), nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(3, 16))

    def forward(self, x):
        return F.linear(F.relu(F.linear(x, self.w1, self.b1)), self.w2)


def test_functional_linear_opens_a_space_of_neurons():
    groups = structures(FunctionalMLP(), torch.randn(2, 6), strict=True)
    assert len(groups) == 16 and {g.kind for g in groups} == {"neuron"}
    assert _stripes(groups, "w2") == {(1, "in")}


class ComputedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.w = nn.Parameter(torch.randn(8, 4, 3, 3))

    def forward(self, x):
        return F.conv2d(self.conv(x), self.w * 2)   # a computed weight: its columns cannot be followed


def test_a_conv_on_a_computed_weight_is_an_unknown_case():
    with pytest.raises(UnsupportedOperation, match="conv2d"):
        structures(ComputedWeight(), torch.randn(1, 4, 8, 8), strict=True)
    with pytest.warns(UnknownOpWarning):
        assert structures(ComputedWeight(), torch.randn(1, 4, 8, 8)) == []


LAYERS = {  # net, input shape; layer 0 opens 6 channels, the last layer reads them
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), nn.ReLU(), nn.Conv1d(6, 3, 1)), (1, 2, 10)),
    "conv3d": (lambda: nn.Sequential(nn.Conv3d(2, 6, 3), nn.BatchNorm3d(6), nn.ReLU(), nn.MaxPool3d(2),
                                     nn.Conv3d(6, 3, 1)), (1, 2, 6, 6, 6)),
    "convtranspose1d": (lambda: nn.Sequential(nn.ConvTranspose1d(2, 6, 3), nn.ReLU(), nn.Conv1d(6, 3, 1)), (1, 2, 5)),
    "convtranspose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(2, 6, 3, stride=2), nn.ReLU(),
                                              nn.ConvTranspose2d(6, 3, 2)), (1, 2, 5, 5)),
    "convtranspose3d": (lambda: nn.Sequential(nn.ConvTranspose3d(2, 6, 3), nn.ReLU(), nn.Conv3d(6, 3, 1)),
                        (1, 2, 3, 3, 3)),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_conv_layer_opens_a_space(name):
    make, shape = LAYERS[name]
    net = make()
    groups = structures(net, torch.randn(shape), strict=True)
    assert len(groups) == 6
    last = len(net) - 1
    # a transposed conv's weight is (C_in, C_out/groups, k...): it writes along dim 1 and reads along dim 0
    assert (int(net[0].transposed), "out") in _stripes(groups, "0.weight")
    assert _stripes(groups, f"{last}.weight") == {(int(not net[last].transposed), "in")}


def test_depthwise_conv1d_carries_its_input_channels():
    net = nn.Sequential(nn.Conv1d(2, 4, 1), nn.ReLU(), nn.Conv1d(4, 8, 3, groups=4), nn.ReLU(), nn.Conv1d(8, 2, 1))
    groups = structures(net, torch.randn(1, 2, 9), strict=True)
    assert len(groups) == 4   # the depthwise filters (2 per channel) go with their input channel
    assert _stripes(groups, "2.weight") == {(0, "out")}


def test_a_grouped_transposed_conv_is_an_unknown_case():
    net = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ConvTranspose2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 1))
    with pytest.raises(UnsupportedOperation, match="grouped ConvTranspose2d"):
        structures(net, torch.randn(1, 2, 5, 5), strict=True)


class OwnForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(x).flip(1)


def test_a_leaf_conv_with_its_own_forward_is_an_unknown_case():
    net = nn.Sequential(nn.Conv2d(2, 4, 1), OwnForward(4, 4, 1), nn.Conv2d(4, 2, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = structures(net, torch.randn(1, 2, 5, 5), leaf_modules=(OwnForward,))
    assert groups == [] and any(issubclass(w.category, UnknownOpWarning) for w in caught)


def test_batchnorm_act2d_gains_groups():
    timm = pytest.importorskip("timm")
    net = nn.Sequential(nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8), nn.Conv2d(8, 4, 1))
    groups = structures(net, torch.randn(1, 3, 8, 8), strict=True)
    assert len(groups) == 8
    assert _stripes(groups, "1.weight") == {(0, "out")} and _stripes(groups, "1.running_mean") == {(0, "state")}


@pytest.mark.parametrize("cls", ["StdConv2d", "ScaledStdConv2d"])
def test_a_weight_standardized_conv_counts_its_input_columns_as_writers(cls):
    timm = pytest.importorskip("timm")
    std = getattr(timm.layers, cls)
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), std(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 2, 1))
    groups = structures(net, torch.randn(1, 3, 8, 8), strict=True)
    assert len(groups) == 8 + 6
    # a column goes only with its silent channel: the standardization reads it, so it is a writer
    assert _stripes(groups, "2.weight") == {(0, "out"), (1, "out")}
    assert _stripes(groups, "0.weight") == {(0, "out")}
    if cls == "ScaledStdConv2d":
        assert _stripes(groups, "2.gain") == {(0, "out")}


class StdConvReLU(nn.Conv2d):
    """A standardized conv whose module does more than the conv (a ReLU after it)."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6)
        return torch.relu(F.conv2d(x, w.reshape_as(self.weight), self.bias))


def test_a_weight_standardized_conv_inside_a_larger_forward_pins_its_inputs():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), StdConvReLU(8, 6, 3), nn.Conv2d(6, 2, 1))
    groups = structures(net, torch.randn(1, 3, 8, 8), strict=True)  # a known limit, pinned: not an error
    assert len(groups) == 6                          # no PaddedStdConv could replace it: conv 0's channels stay
    assert _stripes(groups, "0.weight") == set()