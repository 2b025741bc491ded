"""Compaction of attention heads: exact, fewer heads, and the module's own forward still runs.

A head goes when its value rows are zero (it outputs zero whatever q and k hold) or when the output
projection's columns that read it are zero; zero query and key rows alone leave uniform attention, the
mean of v, so nothing goes. Each case is checked on the example input (inside ``compact``) and on fresh
random inputs of another batch size.
"""

from __future__ import annotations

import pytest
import torch
from attention_nets import BUILDERS, D, E, Explicit, Fused, Grouped, H, QueryReadTwice, SplitSize, T, Torch, zero_head
from torch import nn

from torchslim import UnknownOpWarning, compact, load_compact, save_compact, structures, verify
from torchslim.layers import NarrowMultiheadAttention
from torchslim.surgery.heads import attrs_of

X = torch.randn(2, T, E)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compact_exactly(model: nn.Module) -> nn.Module:
    small = compact(model, X, strict=True, capture="fx")
    assert verify(model, small, torch.randn(5, T, E)).ok
    return small


@pytest.mark.parametrize("which", ["v", "o", "qkvo"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_head_with_zero_values_or_unread_goes(name, which):
    model = BUILDERS[name]().eval()
    zero_head(model, 1, which)
    small = compact_exactly(model)
    members = H // getattr(model, "num_key_value_groups", 1)
    assert len(structures(small, X, kinds=("head",), strict=True, capture="fx")) == members - 1
    assert n_params(small) < n_params(model)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_zero_queries_and_keys_alone_remove_nothing(name):
    """softmax(0) is uniform: the head still outputs the mean of its values."""
    model = BUILDERS[name]().eval()
    zero_head(model, 1, "qk")
    assert n_params(compact_exactly(model)) == n_params(model)


def test_zero_values_of_a_query_read_twice_remove_nothing():
    """q also feeds another layer, so its rows decide silence with v's: zero v alone keeps the head."""
    model = QueryReadTwice().eval()
    zero_head(model, 1, "v")
    assert n_params(compact_exactly(model)) == n_params(model)
    zero_head(model, 1, "q")
    zero_head(model, 1, "k")
    assert n_params(compact_exactly(model)) < n_params(model)


@pytest.mark.parametrize("model, attrs", [(Explicit(), {"n_head": 2}), (Fused(), {"num_heads": 2, "attn_dim": 16}),
                                          (SplitSize(), {"num_heads": 2, "split_size": 16})])
def test_head_counts_and_widths_follow_the_projections(model, attrs):
    model.eval()
    for g in structures(model, X, kinds=("head",), strict=True)[::2]:
        g.zero_()
    small = compact_exactly(model)
    assert {a: getattr(small, a) for a in attrs} == attrs


def test_grouped_queries_go_with_their_key_value_head():
    model = Grouped(kv_heads=2).eval()
    zero_head(model, 0, "v")
    small = compact_exactly(model)
    assert (small.q_proj.out_features, small.k_proj.out_features, small.num_key_value_groups) == (16, 8, 2)


def test_timm_attention_keeps_its_class_and_forward():
    timm = pytest.importorskip("timm")
    for fused in (True, False):
        model = timm.layers.Attention(E, num_heads=H).eval()
        model.fused_attn = fused
        zero_head_rows = slice(2 * E + 8, 2 * E + 16)  # head 1 of v in the fused projection
        with torch.no_grad():
            model.qkv.weight[zero_head_rows] = 0
        small = compact_exactly(model)
        assert type(small) is type(model) and (small.num_heads, small.attn_dim) == (H - 1, E - 8)


def test_the_default_finds_a_head_count_and_a_query_projection():
    spec = attrs_of(Explicit())
    assert (spec.heads, spec.head_dim) == ("n_head", "head_dim") and ("q", 1) in spec.query
    assert attrs_of(nn.Linear(2, 2)) is None


def test_channel_multiple_rounds_channels_not_heads():
    """Two of four heads go: rounding their count to a multiple of 4 would keep them all."""
    model = Explicit().eval()
    for head in (1, 2):
        zero_head(model, head, "v")
    small = compact(model, X, strict=True, capture="fx", channel_multiple=4)
    assert (small.n_head, small.q.out_features, small.o.in_features) == (2, 2 * D, 2 * D)
    assert verify(model, small, torch.randn(5, T, E)).ok


# -- nn.MultiheadAttention -------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "bool", "float", "per_head", "padding"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_narrow_multihead_attention_is_multihead_attention_at_full_width(batch_first, mask, need_weights):
    gen = torch.Generator().manual_seed(0)
    ref = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    narrow = NarrowMultiheadAttention(E, H, D, batch_first=batch_first).eval()
    narrow.load_state_dict(ref.state_dict())
    b, x = 3, torch.randn(3, T, E, generator=gen)
    x = x if batch_first else x.transpose(0, 1)
    kw = {"attn_mask": torch.ones(T, T, dtype=torch.bool).triu(1)} if mask == "bool" else \
        {"attn_mask": torch.randn(T, T, generator=gen)} if mask == "float" else \
        {"attn_mask": torch.randn(b * H, T, T, generator=gen)} if mask == "per_head" else \
        {"key_padding_mask": torch.arange(T).expand(b, T) >= T - 2} if mask == "padding" else {}
    for average in (True, False):
        want, got = ref(x, x, x, need_weights=need_weights, average_attn_weights=average, **kw), \
            narrow(x, x, x, need_weights=need_weights, average_attn_weights=average, **kw)
        torch.testing.assert_close(got[0], want[0])
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1])


def test_multihead_attention_loses_heads_and_width_exactly_saves_and_loads(tmp_path):
    model = Torch().eval()
    zero_head(model, 1, "v")
    small = compact_exactly(model)
    assert isinstance(small.attn, NarrowMultiheadAttention) and small.attn.num_heads == H - 1
    zero_head(small, 2, "o")  # compact again: a narrow one stays narrow
    smaller = compact_exactly(small)
    assert smaller.attn.num_heads == H - 2 and smaller.attn.in_proj_weight.shape == (3 * (H - 2) * D, E)
    save_compact(smaller, tmp_path / "mha.pt")
    assert verify(smaller, load_compact(tmp_path / "mha.pt", model=Torch()), X).ok


def test_torchvision_vit_loses_heads_neurons_and_width_exactly():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    nn.init.normal_(model.heads.head.weight)  # zero at init: the output would be 0
    groups = structures(model, x, kinds=("head", "neuron", "embed"))
    assert {g.kind for g in groups} == {"head", "neuron", "embed"}
    for g in groups[::3]:
        g.zero_()
    with pytest.warns(UnknownOpWarning, match="whole"):  # its forward reshapes to self.hidden_dim: the width stays
        small = compact(model, x)
    assert all(isinstance(b.self_attention, NarrowMultiheadAttention) for b in small.encoder.layers)
    assert verify(model, small, torch.randn(2, 3, 32, 32)).ok and n_params(small) < 0.85 * n_params(model)
