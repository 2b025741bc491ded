"""Compaction of attention heads: exact, fewer heads, and the module's own forward still runs.

A head goes when its value rows are zero (it outputs zero whatever q and k hold) or when the output
projection's columns that read it are zero; zero query and key rows alone leave uniform attention, the
mean of v, so nothing goes. Each case is checked on the example input (inside ``compact``) and on fresh
random inputs of another batch size.
"""

from __future__ import annotations

import pytest
import torch
from attention_nets import BUILDERS, D, E, Explicit, Fused, Grouped, H, QueryReadTwice, SplitSize, T, zero_head
from torch import nn

from torchslim import compact, structures, verify
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
