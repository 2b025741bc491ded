from collections import Counter

import pytest
import torch
from nets import MLP, TinyLeNet, TinyResNet
from torch import nn

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


def _channel_shuffle(x, groups):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, c, h, w)


class _Shuffle(nn.Module):
    """ShuffleNet-like: two branches, cat, shuffle (g=2), chunk, two branches on one half, cat, shuffle (g=3)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.b, self.bn_b = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.dw, self.bn_dw = nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.BatchNorm2d(6)  # reads a strided half
        self.d, self.bn_d = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6)
        self.e = nn.Conv2d(6, 6, 1)
        self.head = nn.Conv2d(18, 5, 1)
        self.fc = nn.Linear(18 * 4, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.bn_a(self.a(x))), torch.relu(self.bn_b(self.b(x)))], 1)
        y1, y2 = _channel_shuffle(y, 2).chunk(2, dim=1)
        d = torch.relu(self.bn_d(self.d(self.bn_dw(self.dw(y2)))))
        z = _channel_shuffle(torch.cat([y1, d, torch.relu(self.e(y2))], 1), 3)
        flat = torch.flatten(nn.functional.adaptive_avg_pool2d(z, 2), 1)   # channel k: features 4k..4k+3
        return self.head(z).mean((2, 3)) + self.fc(flat)


def test_channel_shuffle_is_followed_exactly():
    net, x = _Shuffle(), torch.randn(2, 3, 8, 8)
    fams = {g.family.label: g.family for g in structures(net, x, strict=True)}
    assert set(fams) == {"a", "b", "d", "e"}
    # shuffle(g=2) puts a's channel i at 2i, so y1 = a[0:3], b[0:3] interleaved and y2 the rest;
    # shuffle(g=3) of [y1, d, e] puts y1's entry k at 3k: a[0:3] at 0, 6, 12 of z
    head = [(s.lo, s.hi, s.offset, s.stride) for s in fams["a"].stripes if s.param == "head.weight"]
    assert head == [(0, 3, 0, 6)]
    fc = [(s.lo, s.hi, s.offset, s.stride, s.width) for s in fams["a"].stripes if s.param == "fc.weight"]
    assert fc == [(0, 3, 0, 24, 4)]
    dw = [(s.lo, s.hi, s.offset, s.stride) for s in fams["a"].stripes if s.param == "dw.weight"]
    assert dw == [(3, 6, 0, 2)]                               # y2 = a[3:6] at 0, 2, 4 and b[3:6] at 1, 3, 5
    assert [(s.offset, s.stride) for s in fams["e"].stripes if s.param == "head.weight"] == [(2, 3)]
    g = [g for g in structures(net, x) if g.name == "a:channel[1]"][0]
    expected = (net.a.weight[1].pow(2).sum() + net.a.bias[1] ** 2 + net.bn_a.weight[1] ** 2
                + net.bn_a.bias[1] ** 2 + net.head.weight[:, 6].pow(2).sum()
                + net.fc.weight[:, 24:28].pow(2).sum()).sqrt()
    torch.testing.assert_close(g.norm(), expected.detach())


@pytest.mark.parametrize("seed", range(4))
def test_channel_shuffle_compacts_exactly(seed):
    from nets import randomize_bn

    from torchslim import verify

    torch.manual_seed(seed)
    net, x = randomize_bn(_Shuffle(), seed).eval(), torch.randn(2, 3, 8, 8)
    groups = structures(net, x, strict=True)
    gen = torch.Generator().manual_seed(seed)
    for i in torch.randperm(len(groups), generator=gen)[: len(groups) // 2]:
        groups[i].zero_()
    small = compact(net, x)   # raises VerificationError if the shuffles or chunks came out misaligned
    assert verify(net, small, torch.randn(4, 3, 8, 8)).ok


def test_shuffled_trunk_channels_are_removed_in_line():
    """Two channels of a and of b (one in each chunk), two of d and of e: all go, renumbered to line up."""
    from nets import randomize_bn

    from torchslim import verify

    torch.manual_seed(0)
    net, x = randomize_bn(_Shuffle()).eval(), torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in structures(net, x, strict=True)}
    for name in ["a:channel[0]", "a:channel[5]", "b:channel[1]", "b:channel[4]", "d:channel[2]", "d:channel[3]",
                 "e:channel[0]", "e:channel[3]"]:
        groups[name].zero_()
    small = compact(net, x)
    # b is renumbered onto a's kept positions (per chunk), d and e onto y1's: a shuffle needs the same in each group
    assert [small.get_submodule(m).out_channels for m in "abde"] == [4, 4, 4, 4]
    assert small.head.in_channels == 12 and small.fc.in_features == 48
    assert verify(net, small, torch.randn(4, 3, 8, 8)).ok


class _NotAShuffle(nn.Module):
    """Channels viewed as (2, 2, C/4) and reversed: a permutation, but not one swap of two factors."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
        self.side, self.out = nn.Conv2d(3, 5, 1), nn.Conv2d(5, 2, 1)

    def forward(self, x):
        y = self.a(x)
        b, c, h, w = y.size()
        y = y.view(b, 2, 2, c // 4, h, w).permute(0, 3, 2, 1, 4, 5).reshape(b, c, h, w)
        return self.head(y), self.out(torch.relu(self.side(x)))


def test_a_permutation_that_is_not_a_shuffle_stays_fixed():
    net, x = _NotAShuffle(), torch.randn(1, 3, 4, 4)
    assert {g.family.label for g in structures(net, x)} == {"side"}
    with pytest.raises(UnsupportedOperation, match="reshape"):
        structures(net, x, strict=True)
