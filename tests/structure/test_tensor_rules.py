"""Tensor ops between layers: split by sizes, interpolate/upsample, pad, pixel (un)shuffle.

For each op a toy model: the groups found where expected, some zeroed, compaction exact and smaller;
and the cases the compact model cannot repeat on fewer channels (a split of constant sizes, a pad on
the channel dim) pin those channels instead of crashing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import UnknownOpWarning, compact, register_op, structures, verify


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def labels(groups) -> dict[str, int]:
    """Members per family label: ``{"conv1": 8}``."""
    out: dict[str, int] = {}
    for g in groups:
        out[g.family.label] = out.get(g.family.label, 0) + 1
    return out


def zero_compact(net: nn.Module, x: torch.Tensor, which: list[int]) -> nn.Module:
    """Zero groups ``which`` of ``net``'s channel groups, compact, check it is exact and smaller."""
    groups = structures(net, x, strict=True)
    for i in which:
        groups[i].zero_()
    small = compact(net, x, strict=True)
    assert verify(net, small, x).ok
    assert n_params(small) < n_params(net)
    return small


# -- split ----------------------------------------------------------------------------------------

class SplitNet(nn.Module):
    """``split`` by constant sizes: the compact model splits by the same sizes."""

    def __init__(self, sizes):
        super().__init__()
        self.sizes = sizes
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(4, 5, 1) for _ in range(3))
        self.out = nn.Conv2d(15, 4, 1)

    def forward(self, x):
        pieces = torch.split(torch.relu(self.stem(x)), self.sizes, 1)
        return self.out(torch.cat([h(pieces[i]) for i, h in enumerate(self.heads)], 1))


@pytest.mark.parametrize("sizes", [4, [4, 4, 4]])
def test_a_split_of_constant_sizes_pins_its_input_and_compacts_the_rest(sizes):
    net = SplitNet(sizes).eval()
    x = torch.randn(2, 3, 8, 8)
    groups = structures(net, x, strict=True)
    assert "stem" not in labels(groups)           # its channels are split by constant sizes
    assert labels(groups)["heads.0"] == 5          # the pieces' readers still give groups
    stem = net.stem.weight.detach().clone()
    with torch.no_grad():
        net.stem.weight[1] = 0                     # a zero stem channel cannot go: the pieces keep 4
        net.stem.bias[1] = 0
    small = zero_compact(net, x, [0, 7])
    assert small.stem.out_channels == 12 and torch.equal(small.stem.weight[0], stem[0])
    assert [h.out_channels for h in small.heads] == [4, 4, 5]


def test_res2net_split_compacts_exactly():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("res2net50_14w_8s", num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    groups = structures(net, x, strict=True)
    for g in groups[::3]:
        g.zero_()
    small = compact(net, x, strict=True)
    assert verify(net, small, x).ok
    assert n_params(small) < 0.8 * n_params(net)
    assert small.layer1[1].conv1.out_channels == net.layer1[1].conv1.out_channels  # split by self.width


def test_a_chunk_still_ties_its_pieces():
    class Chunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            a, b = self.stem(x).chunk(2, 1)
            return self.out(torch.cat([torch.relu(b), a], 1))

    net = Chunk().eval()
    x = torch.randn(2, 3, 4, 4)
    assert labels(structures(net, x, strict=True)) == {"stem": 8}
    zero_compact(net, x, [0, 4])                   # channel 0 of both pieces


class WrongLeaf(nn.Module):
    """Keeps its first 4 channels: taught to the tracer, wrongly, as element-wise."""

    def forward(self, x):
        return torch.cat([x[:, :4], x[:, :4]], 1)


def test_a_cut_that_breaks_a_module_is_undone_with_a_warning_naming_it():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), WrongLeaf(), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(2, 3, 4, 4)
    with register_op(WrongLeaf, "elementwise"):
        structures(net, x, leaf_modules=(WrongLeaf,))[0].zero_()
        with pytest.warns(UnknownOpWarning, match=r"kept 1 group family whole.*: 0 \(module '2'"):
            small = compact(net, x, leaf_modules=(WrongLeaf,))
    assert small[0].out_channels == 8 and small[2].in_channels == 8


# -- interpolate / upsample -----------------------------------------------------------------------

class Up(nn.Module):
    def __init__(self, up: nn.Module | None):
        super().__init__()
        self.conv, self.up, self.out = nn.Conv2d(3, 8, 3, padding=1), up, nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = self.up(y) if self.up is not None else F.interpolate(y, scale_factor=2, mode="bilinear")
        return self.out(y)


@pytest.mark.parametrize("up", [None, nn.Upsample(scale_factor=2), nn.UpsamplingNearest2d(scale_factor=2),
                                nn.UpsamplingBilinear2d(scale_factor=2)])
def test_upsampling_passes_channels(up):
    net = Up(up).eval()
    x = torch.randn(2, 3, 6, 6)
    assert labels(structures(net, x, strict=True)) == {"conv": 8}
    small = zero_compact(net, x, [1, 5])
    assert small.conv.out_channels == 6


# -- pad ------------------------------------------------------------------------------------------

class Pad(nn.Module):
    def __init__(self, pad: nn.Module | None, channels: bool = False, value: float = 0.0):
        super().__init__()
        self.conv, self.pad, self.out = nn.Conv2d(3, 8, 3), pad, nn.Conv2d(8 + 2 * channels, 4, 3)
        self.channels, self.value = channels, value

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if self.pad is not None:
            return self.out(self.pad(y))
        return self.out(F.pad(y, (1, 1, 1, 1, int(self.channels), int(self.channels)), value=self.value))


@pytest.mark.parametrize("pad", [None, nn.ZeroPad2d(1), nn.ConstantPad2d((1, 0, 2, 1), 0.0), nn.ReflectionPad2d(1),
                                 nn.ReplicationPad2d((0, 1, 1, 0))])
def test_a_pad_of_the_space_passes_channels(pad):
    net = Pad(pad).eval()
    x = torch.randn(2, 3, 8, 8)
    assert labels(structures(net, x, strict=True)) == {"conv": 8}
    small = zero_compact(net, x, [2, 3])
    assert small.conv.out_channels == 6


def test_a_nonzero_constant_pad_removes_a_channel_only_when_unread():
    net = Pad(None, value=1.0).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        net.conv.weight[2] = 0                     # channel 2 is 0 inside and 1 on the border: it stays
        net.conv.bias[2] = 0
        net.out.weight[:, 5] = 0                   # nobody reads channel 5: it goes
    small = compact(net, x, strict=True)
    assert small.conv.out_channels == 7 and verify(net, small, x).ok


def test_a_pad_on_the_channel_dim_pins_channels():
    net = Pad(None, channels=True).eval()
    x = torch.randn(2, 3, 8, 8)
    assert "conv" not in labels(structures(net, x, strict=True))
    with torch.no_grad():
        net.conv.weight[2] = 0
        net.conv.bias[2] = 0
    small = compact(net, x, strict=True)
    assert small.conv.out_channels == 8 and verify(net, small, x).ok


# -- pixel shuffle --------------------------------------------------------------------------------

class SubPixel(nn.Module):
    """ESPCN's upsampler: a conv to ``C·r²`` channels, ``pixel_shuffle(r)``, a conv."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.conv, self.shuffle, self.out = nn.Conv2d(3, 16, 3, padding=1), nn.PixelShuffle(2), nn.Conv2d(4, 3, 3)

    def forward(self, x):
        y = self.conv(x)
        y = F.pixel_shuffle(y, 2) if self.functional else self.shuffle(y)
        return self.out(torch.relu(y))


@pytest.mark.parametrize("functional", [False, True])
def test_pixel_shuffle_removes_blocks_of_r_squared_channels(functional):
    net = SubPixel(functional).eval()
    x = torch.randn(2, 3, 6, 6)
    groups = structures(net, x, strict=True)
    assert labels(groups) == {"conv": 4}           # output channel c is conv channels 4c .. 4c + 3
    with torch.no_grad():
        member = net.conv.weight[4:8].pow(2).sum() + net.conv.bias[4:8].pow(2).sum() + net.out.weight[:, 1].pow(2).sum()
        assert float(groups[1].norm()) ** 2 == pytest.approx(float(member), rel=1e-5)
    small = zero_compact(net, x, [1])
    assert (small.conv.out_channels, small.out.in_channels) == (12, 3)


class Unshuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.down, self.out = nn.Conv2d(3, 4, 3, padding=1), nn.PixelUnshuffle(2), nn.Conv2d(16, 8, 1)
        self.up = nn.PixelShuffle(2)
        self.last = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        y = self.out(self.down(torch.relu(self.conv(x))))
        return self.last(self.up(y))


def test_pixel_unshuffle_widens_each_channel_into_r_squared():
    net = Unshuffle().eval()
    x = torch.randn(2, 3, 8, 8)
    assert labels(structures(net, x, strict=True)) == {"conv": 4, "out": 2}
    small = zero_compact(net, x, [2, 4])           # conv channel 2 (out's columns 8..11), out's block 0
    assert (small.conv.out_channels, small.out.in_channels, small.out.out_channels) == (3, 12, 4)
    assert small.last.in_channels == 1


# -- layer scale ----------------------------------------------------------------------------------

class LayerScale(nn.Module):
    """A residual block whose branch is scaled per channel by a parameter γ, in the forms the zoo writes it."""

    SHAPES = {"c11": (8, 1, 1), "view": (8,), "last": (8,), "tokens": (1, 1, 8)}

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stem, self.body, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.gamma = nn.Parameter(torch.rand(self.SHAPES[form]) + 0.5)

    def forward(self, x):
        x = self.stem(x)
        y = self.body(torch.relu(x))
        if self.form == "c11":                     # torchvision's CNBlock: self.layer_scale * block(x)
            y = self.gamma * y
        elif self.form == "view":                  # timm's LayerScale2d, in place
            y = y.mul_(self.gamma.view(1, -1, 1, 1))
        else:                                      # channels last, (B, H, W, C) or tokens (B, H·W, C)
            t = y.permute(0, 2, 3, 1) if self.form == "last" else y.flatten(2).transpose(1, 2)
            t = t * self.gamma
            y = t.permute(0, 3, 1, 2) if self.form == "last" else t.transpose(1, 2).reshape(y.shape)
        return self.head(torch.relu(x + y))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("form", list(LayerScale.SHAPES))
def test_a_layer_scale_writes_the_channels_it_scales(form, capture):
    torch.manual_seed(0)
    net, x = LayerScale(form).eval(), torch.randn(2, 3, 6, 6)
    groups = structures(net, x, strict=True, capture=capture)
    assert labels(groups) == {"stem+1": 8}         # the trunk: stem, body and γ in one family
    dim = LayerScale.SHAPES[form].index(8)
    assert ("gamma", dim, (5,)) in [(p, d, tuple(i.tolist())) for p, d, i in groups[5].slices]
    for g in (groups[1], groups[5]):
        g.zero_()                                  # γ_k among them: 0 · γ_k on a silent channel
    small = compact(net, x, strict=True, capture=capture)
    assert small.gamma.shape[dim] == 6 and small.stem.out_channels == small.body.out_channels == 6
    fresh = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(small(fresh), net(fresh), rtol=1e-5, atol=1e-5)


# -- a fused gated MLP --------------------------------------------------------------------------

class GatedMLP(nn.Module):
    """timm's packed SwiGLU: ``gate, up = fc(x).chunk(2, -1)``; ``down(silu(gate) * up)``."""

    def __init__(self, width: int = 8, hidden: int = 6):
        super().__init__()
        self.fc, self.down = nn.Linear(width, 2 * hidden), nn.Linear(hidden, width)

    def forward(self, x):
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_a_gated_product_of_two_chunks_ties_gate_and_up_rows(capture):
    torch.manual_seed(0)
    net, x = GatedMLP().eval(), torch.randn(2, 5, 8)
    groups = structures(net, x, strict=True, capture=capture)
    assert labels(groups) == {"fc+1": 6}           # a neuron: gate row k, up row 6 + k, down column k
    rows = sorted((p, d, i) for p, d, ix in groups[2].slices for i in ix.tolist())
    assert rows == [("down.weight", 1, 2), ("fc.bias", 0, 2), ("fc.bias", 0, 8), ("fc.weight", 0, 2),
                    ("fc.weight", 0, 8)]
    groups[2].zero_()
    groups[4].zero_()
    small = compact(net, x, strict=True, capture=capture)
    assert (small.fc.out_features, small.down.in_features) == (8, 4)
    fresh = torch.randn(3, 5, 8)
    torch.testing.assert_close(small(fresh), net(fresh), rtol=1e-5, atol=1e-5)


# -- reshape_as -----------------------------------------------------------------------------------

class LinearNorm(nn.Module):
    """LeViT's ``LinearNorm``: a Linear whose BatchNorm1d runs over the tokens flattened into the batch."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear, self.bn = nn.Linear(d_in, d_out), nn.BatchNorm1d(d_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


def test_reshape_as_follows_the_channels_like_reshape():
    net = nn.Sequential(LinearNorm(4, 8), nn.Hardswish(), LinearNorm(8, 3)).eval()
    small = zero_compact(net, torch.randn(2, 5, 4), [1, 4])
    assert small[0].linear.out_features == small[0].bn.num_features == small[2].linear.in_features == 6
