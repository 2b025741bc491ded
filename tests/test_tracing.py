from collections import Counter

import pytest
import torch
from torch import nn

from nets import MLP, TinyLeNet, TinyResNet
from torchslim import ShapeMismatch, UnsupportedOperation, compact, structures


def _count(groups):
    return Counter((g.family.label, g.kind) for g in groups)


def test_lenet_groups_of_every_kind():
    groups = structures(TinyLeNet(), torch.randn(2, 1, 28, 28),
                        kinds=("channel", "neuron", "filter", "in_channel", "shape"))
    c = _count(groups)
    assert c[("conv1", "channel")] == 6 and c[("conv2", "channel")] == 8
    assert c[("fc1", "neuron")] == 32
    assert ("fc2", "neuron") not in c  # the network's output is not removable
    assert c[("conv1", "shape")] == 25 and c[("conv2", "shape")] == 6 * 25
    assert c[("conv2", "filter")] == 8 and c[("conv2", "in_channel")] == 6


def test_channel_group_couples_bias_and_flattened_consumer():
    net = TinyLeNet()
    g = [g for g in structures(net, torch.randn(1, 1, 28, 28)) if g.name == "conv2:channel[3]"][0]
    expected = (net.conv2.weight[3].pow(2).sum() + net.conv2.bias[3] ** 2
                + net.fc1.weight[:, 3 * 16:4 * 16].pow(2).sum()).sqrt()
    torch.testing.assert_close(g.norm(), expected.detach())
    assert g.numel() == 6 * 25 + 1 + 32 * 16
    g.zero_()
    assert net.conv2.weight[3].abs().sum() == 0 and net.conv2.bias[3] == 0
    assert net.fc1.weight[:, 48:64].abs().sum() == 0 and net.fc1.weight[:, 64:80].abs().sum() > 0


def test_shape_group_is_one_kernel_position_across_filters():
    net = TinyLeNet()
    shape = [g for g in structures(net, torch.randn(1, 1, 28, 28), kinds=("shape",))
             if g.family.label == "conv2"]
    c, i, j = 4, 1, 3
    g = shape[c * 25 + i * 5 + j]
    torch.testing.assert_close(g.norm(), net.conv2.weight[:, c, i, j].norm().detach())
    g.zero_()
    assert net.conv2.weight[:, c, i, j].abs().sum() == 0
    assert (net.conv2.weight[:, c] != 0).sum() == 8 * 24


def test_residual_additions_unite_channels():
    net = TinyResNet()
    groups = structures(net, torch.randn(2, 1, 16, 16))
    labels = {g.family.label for g in groups}
    # stem, layer1.0.bn2, layer1.1.bn2 all write the same trunk channels: one family
    trunk = [g for g in groups if g.family.label.startswith("stem")]
    assert len(trunk) == 8
    params = {s.param for s in trunk[0].family.stripes}
    assert {"stem.weight", "bn.weight", "layer1.0.conv2.weight", "layer1.1.bn2.bias",
            "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight"} <= params
    assert "layer1.0.conv1" in labels  # inner channels of a block are their own family
    # the last stage's trunk reaches fc through pooling and view: removable as well
    assert any("layer2.0.conv2" in g.family.label for g in groups)


def test_mlp_neurons():
    c = _count(structures(MLP(), torch.randn(2, 8, 8)))
    assert c == Counter({("net.1", "neuron"): 40, ("net.3", "neuron"): 30})


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
        self.head = nn.Conv2d(8, 2, 1)
        self.side = nn.Conv2d(3, 5, 1)
        self.out = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.a(x), self.b(x)], 1)), self.out(torch.relu(self.side(x)))


def test_cat_offsets_each_input_into_the_consumer():
    net, x = _Cat(), torch.randn(1, 3, 8, 8)
    groups = {g.family.label: g.family for g in structures(net, x)}
    assert set(groups) == {"a", "b", "side"}
    head_a = [s for s in groups["a"].stripes if s.param == "head.weight"]
    head_b = [s for s in groups["b"].stripes if s.param == "head.weight"]
    assert [(s.offset, s.lo, s.hi) for s in head_a + head_b] == [(0, 0, 4), (4, 0, 4)]
    b2 = [g for g in structures(net, x) if g.name == "b:channel[2]"][0].zero_()
    assert net.head.weight[:, 6].abs().sum() == 0 and net.head.weight[:, 2].abs().sum() != 0
    assert b2.numel() == 3 * 9 + 1 + 2          # its filter, its bias, its column of head


class _Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)
        self.side, self.out = nn.Conv2d(3, 5, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.head(torch.roll(self.a(x), 1, 1)), self.out(torch.relu(self.side(x)))


def test_unknown_operation_leaves_channels_out_or_raises_when_strict():
    net, x = _Rolled(), torch.randn(1, 3, 8, 8)
    labels = {g.family.label for g in structures(net, x)}
    assert labels == {"side"}  # roll mixes channel indices: its input is kept whole
    with pytest.raises(UnsupportedOperation, match="roll"):
        structures(net, x, strict=True)


def test_unknown_kind_is_an_error():
    with pytest.raises(UnsupportedOperation, match="choose from"):
        structures(TinyLeNet(), torch.randn(1, 1, 28, 28), kinds=("filters",))


def test_untraceable_model_gets_a_clear_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(UnsupportedOperation, match="trace"):
        structures(Branchy(), torch.randn(1, 3))


def test_tracing_leaves_batchnorm_statistics_alone():
    net = TinyResNet().train()
    before = net.bn.running_mean.clone()
    structures(net, torch.randn(4, 1, 16, 16) + 3)
    assert torch.equal(net.bn.running_mean, before) and net.training


def test_wrong_example_shape_is_a_shape_mismatch():
    with pytest.raises(ShapeMismatch, match=r"\(2, 3, 28, 28\)"):
        structures(TinyLeNet(), torch.randn(2, 3, 28, 28))
    with pytest.raises(ShapeMismatch):
        compact(TinyLeNet(), torch.randn(2, 1, 20, 20))
