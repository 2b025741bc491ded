import random

import pytest
import torch
from nets import MLP, TinyLeNet, TinyResNet, randomize_bn
from torch import nn

import torchslim.surgery.compact as compaction
from torchslim import LoweredConv2d, VerificationError, compact, structures, verify
from torchslim.errors import ConfigError, UnknownOpWarning


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


def _zero_random(groups, fraction, seed=0):
    rng = random.Random(seed)
    for g in rng.sample(groups, int(len(groups) * fraction)):
        g.zero_()


CASES = [(TinyLeNet, (3, 1, 28, 28)), (TinyResNet, (3, 1, 16, 16)), (MLP, (3, 8, 8))]


@pytest.mark.parametrize("make,shape", CASES, ids=lambda v: getattr(v, "__name__", ""))
def test_compact_equals_sparse_model(make, shape):
    model = randomize_bn(make()).eval()
    x = torch.randn(shape)
    _zero_random(structures(model, x), 0.3)
    small = compact(model, x)
    assert _n_params(small) < _n_params(model)
    for seed in range(3):
        probe = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        assert verify(model, small, probe).max_abs_diff <= 1e-5


def test_resnet_trunk_channel_is_removed_everywhere():
    model = randomize_bn(TinyResNet()).eval()
    x = torch.randn(2, 1, 16, 16)
    trunk = [g for g in structures(model, x) if g.family.label.startswith("stem")]
    trunk[2].zero_()
    small = compact(model, x)
    assert small.stem.out_channels == 7 and small.layer1[1].bn2.num_features == 7
    assert small.layer2[0].conv1.in_channels == 7 and small.layer2[0].shortcut[0].in_channels == 7


def test_a_zero_filter_alone_removes_the_channel_when_zero_flows_through():
    model = TinyLeNet().eval()  # conv2 -> maxpool -> flatten -> fc1: every step keeps 0 at 0
    with torch.no_grad():
        model.conv2.weight[5] = 0
        model.conv2.bias[5] = 0
    small = compact(model, torch.randn(2, 1, 28, 28))
    assert small.conv2.out_channels == 7 and small.fc1.in_features == 7 * 16


def test_a_zero_filter_behind_a_sigmoid_is_kept():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Sigmoid(), nn.Conv2d(4, 2, 3), nn.Flatten())
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0  # sigmoid(0) = 0.5 still reaches the next conv
    x = torch.randn(2, 1, 8, 8)
    small = compact(model, x)
    assert small[0].out_channels == 4
    with torch.no_grad():
        model[2].weight[:, 1] = 0  # now nobody reads it
    assert compact(model, x)[0].out_channels == 3


def test_batchnorm_channel_with_zero_gamma_and_beta_is_removed():
    model = randomize_bn(TinyResNet()).eval()
    with torch.no_grad():
        blk = model.layer1[0]
        blk.conv1.weight[2] = 0
        blk.bn1.weight[2] = 0
        blk.bn1.bias[2] = 0
    small = compact(model, torch.randn(2, 1, 16, 16))
    assert small.layer1[0].conv1.out_channels == 7 and small.layer1[0].conv2.in_channels == 7
    assert small.layer1[0].bn1.running_mean.shape == (7,)


def _shape_sparse_lenet():
    model = TinyLeNet().eval()
    with torch.no_grad():
        model.conv1.weight[:, :, 0, :] = 0  # top row
        model.conv1.weight[:, :, :, 4] = 0  # right column
        model.conv1.weight[:, :, 2, 2] = 0  # an inner fiber
        model.conv2.weight[:, :, :, 0] = 0
        model.conv2.weight[:, :, :, 4] = 0  # symmetric: left and right
    return model


def test_zero_kernel_rows_and_columns_shrink_the_conv():
    model, x = _shape_sparse_lenet(), torch.randn(2, 1, 28, 28)
    small = compact(model, x, shapes="crop")
    pad, conv1 = small.conv1
    assert isinstance(pad, nn.ZeroPad2d) and conv1.kernel_size == (4, 4)
    assert small.conv2[0].padding == (-1, -1, 0, 0) and small.conv2[1].kernel_size == (5, 3)


def test_symmetric_crop_with_padding_stays_a_plain_conv():
    model = nn.Sequential(nn.Conv2d(2, 4, 5, padding=2), nn.Flatten())
    with torch.no_grad():
        model[0].weight[:, :, [0, 4], :] = 0
        model[0].weight[:, :, :, [0, 4]] = 0
    small = compact(model, torch.randn(2, 2, 9, 9))
    assert type(small[0]) is nn.Conv2d and small[0].kernel_size == (3, 3) and small[0].padding == (1, 1)


def test_lowered_conv_keeps_only_live_columns():
    model, x = _shape_sparse_lenet(), torch.randn(2, 1, 28, 28)
    small = compact(model, x, shapes="lowered")
    lowered = small.conv1[1]
    assert isinstance(lowered, LoweredConv2d) and len(lowered.columns) == 4 * 4 - 1
    assert verify(model, small, torch.randn(4, 1, 28, 28)).ok


def test_auto_picks_one_of_the_two_and_stays_exact():
    model, x = _shape_sparse_lenet(), torch.randn(8, 1, 28, 28)
    small = compact(model, x, shapes="auto")
    assert verify(model, small, x).ok


def test_compact_refuses_a_model_that_differs(monkeypatch):
    model, x = TinyLeNet().eval(), torch.randn(2, 1, 28, 28)
    monkeypatch.setattr(compaction, "_live_members", lambda fam, multiple: torch.arange(fam.size - 1))
    with pytest.raises(VerificationError, match="differs"):
        compact(model, x)


def test_compact_leaves_the_original_untouched_and_returns_eval_mode():
    model = TinyLeNet().train()
    x = torch.randn(2, 1, 28, 28)
    structures(model, x)[0].zero_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = compact(model, x)
    assert model.training and not small.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["lenet", "mlp", "resnet20"])
def test_compact_the_papers_models(name):
    from torchslim.models import create_model

    model = randomize_bn(create_model(name)).eval()
    x = torch.randn(2, 1, 28, 28)
    groups = structures(model, x, kinds=("channel", "neuron"))
    _zero_random(groups, 0.3, seed=1)
    small = compact(model, x)
    assert _n_params(small) < _n_params(model)
    assert verify(model, small, torch.randn(4, 1, 28, 28)).max_abs_diff <= 1e-5


# -- operations beyond plain chains: each zeroes some groups, compacts, and must stay exact -----------

class _Chunked(nn.Module):
    """A conv's output split in two (chunk), one half through a depthwise conv, then concatenated."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)  # depthwise, 2 filters per input channel
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        left, right = self.a(x).chunk(2, dim=1)
        return self.head(torch.relu(self.bn(torch.cat([left, self.dw(right)], 1))))


class _SqueezeExcite(nn.Module):
    """Mobilenet-v3 style: x · hardsigmoid(fc2(relu(fc1(mean(x))))), then a permuted Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.mlp = nn.Linear(8, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        gate = nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        y = (x * gate).permute(0, 2, 3, 1)                     # NHWC: the Linear reads the channels last
        return self.out(torch.relu(self.mlp(y))).mean((1, 2))


@pytest.mark.parametrize("net_cls, zero", [
    (_Chunked, ["a:channel[1]", "a:channel[5]", "a:channel[6]"]),
    (_SqueezeExcite, ["conv+1:channel[2]", "fc1:channel[0]", "mlp:neuron[4]"]),
])
def test_chunk_cat_depthwise_and_gating_compact_exactly(net_cls, zero):
    torch.manual_seed(0)
    net, x = randomize_bn(net_cls()).eval(), torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in structures(net, x, strict=True)}
    for name in zero:
        groups[name].zero_()
    small = compact(net, x)
    assert verify(net, small, torch.randn(4, 3, 8, 8)).ok
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < n(net)


def test_depthwise_conv_shrinks_with_its_input_channels():
    torch.manual_seed(0)
    net, x = randomize_bn(_Chunked()).eval(), torch.randn(2, 3, 8, 8)
    groups = {g.name: g for g in structures(net, x)}
    groups["a:channel[5]"].zero_()                           # the second input channel of dw
    small = compact(net, x)
    assert (small.dw.in_channels, small.dw.out_channels, small.dw.groups) == (3, 6, 3)
    assert small.bn.num_features == 10 and small.head.in_channels == 10


def test_channel_multiple_keeps_widths_a_multiple_and_stays_exact():
    torch.manual_seed(0)
    net, x = randomize_bn(_Chunked()).eval(), torch.randn(2, 3, 8, 8)
    net.head = nn.Conv2d(12, 20, 1)
    tail = nn.Conv2d(20, 3, 1)
    model = nn.Sequential(net, tail).eval()
    groups = [g for g in structures(model, x) if g.family.label == "0.head"]
    for g in groups[:15]:                                    # 5 of 20 channels stay
        g.zero_()
    assert compact(model, x)[1].in_channels == 5
    small = compact(model, x, channel_multiple=4)
    assert small[0].head.out_channels == small[1].in_channels == 8
    assert verify(model, small, torch.randn(3, 3, 8, 8)).ok
    assert compact(model, x, channel_multiple=32)[1].in_channels == 20   # capped at the layer's width
    with pytest.raises(ConfigError, match="channel_multiple"):
        compact(model, x, channel_multiple=0)


class _Grouped(nn.Module):
    """A 1x1 conv into a grouped 3x3 conv (4 groups of 3 → 2 channels), as in ResNeXt and RegNet."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12)
        self.g, self.bn2 = nn.Conv2d(12, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn2(self.g(torch.relu(self.bn(self.a(x)))))))


def test_grouped_conv_loses_whole_groups_exactly():
    torch.manual_seed(0)
    net, x = randomize_bn(_Grouped()).eval(), torch.randn(2, 3, 8, 8)
    groups = structures(net, x, strict=True)
    assert [g.name for g in groups] == [f"a+1:channel[{i}]" for i in range(4)]   # one member per group
    assert groups[1].numel() == 3 * 4 + 3 * 2 + 2 * (3 * 9 + 1) + 2 * 2 + 5 * 2
    groups[1].zero_()
    small = compact(net, x)
    assert (small.g.in_channels, small.g.out_channels, small.g.groups) == (9, 6, 3)
    assert verify(net, small, torch.randn(3, 3, 8, 8)).ok


class _Fixed(nn.Module):
    """A Linear whose output is reshaped to a literal width: cutting its neurons breaks this module."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6)

    def forward(self, x):
        return self.a(x).reshape(x.shape[0], 6)


def test_families_that_break_a_module_when_cut_are_kept_whole_with_a_warning():
    torch.manual_seed(0)
    net, x = nn.Sequential(_Fixed(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval(), torch.randn(2, 8)
    for g in structures(net, x, kinds=("neuron",)):
        if g.index == 0:
            g.zero_()  # neuron 0 of the reshaped Linear and of the next one
    with pytest.warns(UnknownOpWarning, match=r"kept 1 group family whole.*0\.a .*module '0'"):
        small = compact(net, x)
    assert (small[0].a.out_features, small[1].out_features) == (6, 4)
    fresh = torch.randn(4, 8)
    torch.testing.assert_close(small(fresh), net(fresh))
