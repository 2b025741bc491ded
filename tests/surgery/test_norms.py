"""Compaction through norms: the RMSNorm rescaling, PaddedLayerNorm, the model width of a small GPT and
ViT, ConvNeXt-style channels, GroupNorm's whole groups; zero readers alone remove nothing."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from norm_nets import GPT, ConvNeXt, ViT, randomize_norms
from torch import nn

from torchslim import compact, load_compact, save_compact, structures, verify
from torchslim.errors import UnknownOpWarning
from torchslim.layers import PaddedLayerNorm, PaddedStdConv
from torchslim.surgery.norms import rms_rescale

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend
GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 50, (2, 16), generator=GEN)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)  # the single-head attention's matmuls: no rule yet
        yield


def _padded(x: torch.Tensor, keep: torch.Tensor, full: int, dim: int) -> torch.Tensor:
    """``x`` with zero entries put back where ``keep`` does not say, along ``dim``."""
    shape = list(x.shape)
    shape[dim] = full
    out = torch.zeros(shape)
    out.index_copy_(dim % x.dim(), keep, x)
    return out


def test_rms_norm_over_the_kept_channels_is_exact_when_rescaled():
    full, keep = 10, torch.tensor([0, 2, 3, 7, 9])
    x, w, eps = torch.randn(4, 5, generator=GEN), torch.rand(full, generator=GEN) + 0.5, 1e-2  # a large ε shows up
    want = F.rms_norm(_padded(x, keep, full, -1), (full,), w, eps)[:, keep]
    new_w, new_eps = rms_rescale(w[keep], eps, full, len(keep))
    torch.testing.assert_close(F.rms_norm(x, (5,), new_w, new_eps), want)
    assert new_eps == pytest.approx(eps * 2) and not torch.allclose(F.rms_norm(x, (5,), w[keep], eps), want)


@pytest.mark.parametrize("dim", [-1, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_padded_layer_norm_is_layer_norm_over_zero_padded_inputs(dim, bias):
    full, keep = 12, torch.tensor([1, 2, 5, 6, 8, 11])
    w, b = torch.rand(full, generator=GEN) + 0.5, torch.randn(full, generator=GEN) if bias else None
    x = torch.randn(2, 6, 3, 3, generator=GEN) if dim == 1 else torch.randn(2, 5, 6, generator=GEN)
    norm = PaddedLayerNorm(6, full, 1e-5, bias=bias, dim=dim)
    with torch.no_grad():
        norm.weight.copy_(w[keep])
        if bias:
            norm.bias.copy_(b[keep])
    padded = _padded(x, keep, full, dim)
    if dim == 1:  # LayerNorm over the channels of (B, C, H, W), as timm's LayerNorm2d
        want = F.layer_norm(padded.permute(0, 2, 3, 1), (full,), w, b).permute(0, 3, 1, 2)
    else:
        want = F.layer_norm(padded, (full,), w, b)
    torch.testing.assert_close(norm(x), want.index_select(dim % x.dim(), keep))


@pytest.mark.parametrize("gain", [True, False])
def test_padded_std_conv_is_the_standardized_conv_over_zero_padded_columns(gain):
    timm = pytest.importorskip("timm")
    full_conv = (timm.layers.ScaledStdConv2d if gain else timm.layers.StdConv2d)(8, 4, 3, padding=1)
    keep = torch.tensor([0, 3, 4, 6, 7])
    with torch.no_grad():
        full_conv.weight.copy_(torch.randn(4, 8, 3, 3, generator=GEN))
        full_conv.weight[:, [1, 2, 5]] = 0                  # the cut columns were zero
        if gain:
            full_conv.gain.copy_(torch.rand(4, 1, 1, 1, generator=GEN) + 0.5)
    x = torch.randn(2, 5, 6, 6, generator=GEN)
    w = nn.Parameter(full_conv.weight.detach()[:, keep].clone())
    padded = PaddedStdConv(w, full_conv.bias, full_conv.gain if gain else None, getattr(full_conv, "scale", 1.0),
                           full_conv.eps, full=8 * 9, padding=1)
    torch.testing.assert_close(padded(x), full_conv(_padded(x, keep, 8, 1)))


def test_compacted_standardized_convs_compact_again_save_and_load(tmp_path):
    timm = pytest.importorskip("timm")
    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), timm.layers.ScaledStdConv2d(8, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 2, 1)).eval()
    x = torch.randn(2, 3, 8, 8, generator=GEN)
    for _ in range(2):
        channels = [g for g in structures(net, x) if g.name.startswith("0:")]
        channels[len(channels) // 2].zero_()
        small = compact(net, x)
        assert isinstance(small[2], PaddedStdConv) and small[2].full == 8 * 9
        _exact(net, small, x)
        net = small
    assert small[2].in_channels == 6
    save_compact(small, tmp_path / "std.pt")
    _exact(small, load_compact(tmp_path / "std.pt"), x)


def _zero_width(model: nn.Module, x: torch.Tensor, fraction: float = 0.3, kind: str = "embed", **kw) -> int:
    """Zero a random ``fraction`` of the ``kind`` groups; the number left."""
    groups = [g for g in structures(model, x, kinds=(kind,), **kw) if g.kind == kind]
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(1))
    cut = order[: int(fraction * len(groups))]
    for i in cut.tolist():
        groups[i].zero_()
    return len(groups) - len(cut)


def _exact(model: nn.Module, small: nn.Module, x: torch.Tensor) -> None:
    for seed in range(2):
        gen = torch.Generator().manual_seed(seed)
        ids = x.dtype == torch.long
        probe = torch.randint(0, 50, x.shape, generator=gen) if ids else torch.randn(x.shape, generator=gen)
        report = verify(model, small, probe)
        assert report.ok, report


@pytest.mark.parametrize("norm, bias", [(nn.LayerNorm, True), (nn.LayerNorm, False), (nn.RMSNorm, True),
                                        (nn.RMSNorm, False)])
def test_gpt_width_compacts_exactly(norm, bias):
    model = randomize_norms(GPT(norm=norm, bias=bias)).eval()
    kept = _zero_width(model, IDS)
    small = compact(model, IDS, strict=False)
    assert small.wte.embedding_dim == small.wpe.embedding_dim == kept
    assert small.head.weight is small.wte.weight  # still tied
    for block in small.blocks:
        assert block.attn.q.in_features == block.fc.in_features == block.out.out_features == kept
        assert block.attn.proj.out_features == kept and block.ln1.weight.shape == (kept,)
    if norm is nn.LayerNorm:
        assert isinstance(small.ln_f, PaddedLayerNorm) and small.ln_f.full == 32
    else:
        assert type(small.ln_f) is nn.RMSNorm and small.ln_f.normalized_shape == (kept,)
    _exact(model, small, IDS)


def test_compacting_twice_stays_exact():
    model = randomize_norms(GPT()).eval()
    _zero_width(model, IDS, 0.2)
    once = compact(model, IDS)
    kept = _zero_width(once, IDS, 0.2)
    twice = compact(once, IDS)
    assert twice.ln_f.weight.shape == (kept,) and twice.ln_f.full == 32
    _exact(once, twice, IDS)  # once, after its own zeros


def test_zero_readers_alone_remove_nothing():
    model = randomize_norms(GPT(tied=False)).eval()
    (fam,) = {g.family for g in structures(model, IDS, kinds=("embed",))}
    with torch.no_grad():  # every column that reads width members 0..9, but none that writes them
        for s in fam.stripes:
            if s.role == "in":
                fam.params[s.param].narrow(s.dim, 0, 10).zero_()
    small = compact(model, IDS)
    assert small.wte.embedding_dim == 32 and isinstance(small.ln_f, nn.LayerNorm)
    _exact(model, small, IDS)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_vit_width_with_class_token_and_position_parameter(capture):
    model, x = randomize_norms(ViT()).eval(), torch.randn(2, 8, 12, generator=GEN)
    kept = _zero_width(model, x, capture=capture)
    small = compact(model, x, capture=capture)
    assert small.cls_token.shape == (1, 1, kept) and small.pos_embed.shape == (1, 9, kept)
    _exact(model, small, x)


@pytest.mark.parametrize("layer_norm_2d", [True, False])
def test_convnext_channels_through_layer_norm(layer_norm_2d):
    model, x = randomize_norms(ConvNeXt(layer_norm_2d=layer_norm_2d)).eval(), torch.randn(2, 3, 32, 32, generator=GEN)
    kept = _zero_width(model, x, kind="channel")
    small = compact(model, x)
    assert small.stem.out_channels == kept and isinstance(small.stem_norm, PaddedLayerNorm)
    assert small.blocks[0].norm.dim == (1 if layer_norm_2d else -1)
    _exact(model, small, x)


class GroupNormNet(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv, self.gn, self.out = nn.Conv2d(3, 16, 3), nn.GroupNorm(groups, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.gn(self.conv(x))))


@pytest.mark.parametrize("groups", [16, 4])
def test_group_norm_loses_whole_groups(groups):
    model, x = randomize_norms(GroupNormNet(groups)).eval(), torch.randn(2, 3, 8, 8, generator=GEN)
    kept = _zero_width(model, x, 0.5, kind="channel")
    small = compact(model, x)
    assert small.gn.num_groups == kept and small.gn.num_channels == small.conv.out_channels == kept * 16 // groups
    _exact(model, small, x)


def test_compact_file_holds_padded_and_rms_norms(tmp_path):
    for norm in (nn.LayerNorm, nn.RMSNorm):
        model = randomize_norms(GPT(norm=norm)).eval()
        _zero_width(model, IDS)
        small = compact(model, IDS)
        save_compact(small, tmp_path / "gpt.pt")
        loaded = load_compact(tmp_path / "gpt.pt", model=GPT(norm=norm))
        assert loaded.head.weight is loaded.wte.weight
        torch.testing.assert_close(loaded(IDS), small(IDS))
