"""Norm rules: the model width ("embed") through LayerNorm/RMSNorm, parameters that write it (position
embeddings, class tokens), GroupNorm's whole groups, the norms that pin, and functional_norms for capture."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from norm_nets import GPT, ViT, randomize_norms
from torch import nn

from torchslim import structures
from torchslim.errors import UnknownOpWarning
from torchslim.structure.norm_rules import functional_norms
from torchslim.structure.tracing import channel_graph

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend
IDS = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))


def _families(model: nn.Module, x: torch.Tensor, kinds=("embed",), **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnknownOpWarning)  # the single-head attention's matmuls: no rule yet
        groups = structures(model, x, kinds=kinds, **kw)
    return list(dict.fromkeys(g.family for g in groups))


def _stripes(fam) -> set[tuple[str, int, str]]:
    return {(s.param, s.dim, s.role) for s in fam.stripes}


def test_gpt_width_is_one_embed_family():
    (fam,) = _families(GPT(), IDS)
    assert fam.kind == "embed" and fam.size == 32 and fam.read_by_norm
    stripes = _stripes(fam)
    expected = {("wte.weight", 1, "out"), ("wpe.weight", 1, "out"), ("ln_f.weight", 0, "out"), ("ln_f.bias", 0, "out")}
    for i in range(2):
        b = f"blocks.{i}"
        expected |= {(f"{b}.{n}.weight", 0, "out") for n in ("ln1", "ln2", "attn.proj", "out")}
        expected |= {(f"{b}.{n}.weight", 1, "in") for n in ("attn.q", "attn.k", "attn.v", "fc")}
    assert expected <= stripes
    assert ("wte.weight", 1, "in") in stripes  # the tied LM head reads the width through the token table


def test_rms_norm_and_no_bias_give_the_same_width():
    (fam,) = _families(GPT(norm=nn.RMSNorm, bias=False), IDS)
    assert fam.kind == "embed" and fam.size == 32
    assert ("blocks.0.ln1.weight", 0, "out") in _stripes(fam)


def test_class_token_and_position_parameter_write_the_width():
    (fam,) = _families(ViT(), torch.randn(2, 8, 12))
    assert fam.kind == "embed" and fam.size == 24
    assert {("cls_token", 2, "out"), ("pos_embed", 2, "out"), ("embed.weight", 0, "out")} <= _stripes(fam)


def test_layer_norm_without_weight_pins_with_a_reason():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 2))
    graph, _ = channel_graph(net, (torch.randn(3, 4),))
    assert any("no weight" in (s.fixed or "") for s in graph.spaces)
    assert _families(net, torch.randn(3, 4), kinds=("neuron",)) == []


class InlineNorm(nn.Module):
    """``F.layer_norm`` as one step of a larger forward: the module cannot be swapped, so its channels pin."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.w = nn.Linear(4, 8), nn.Parameter(torch.ones(8))

    def forward(self, x):
        return F.layer_norm(self.fc(x), (8,), self.w) * 2


def test_layer_norm_inside_a_larger_forward_pins():
    graph, _ = channel_graph(InlineNorm(), (torch.randn(3, 4),))
    assert any("one step of a larger forward" in (s.fixed or "") for s in graph.spaces)


class GroupNormNet(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv, self.gn, self.out = nn.Conv2d(3, 16, 3), nn.GroupNorm(groups, 16), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(torch.relu(self.gn(self.conv(x))))


@pytest.mark.parametrize("groups, members", [(16, 16), (4, 4), (1, 0)])
def test_group_norm_members_are_whole_groups(groups, members):
    fams = _families(GroupNormNet(groups), torch.randn(2, 3, 8, 8), kinds=("channel",))
    assert sum(f.size for f in fams) == members
    if groups == 1:  # one group normalizes all channels together: pinned, and the graph says why
        graph, _ = channel_graph(GroupNormNet(1), (torch.randn(2, 3, 8, 8),))
        assert any("one group" in (s.fixed or "") for s in graph.spaces)


class LlamaRMSNorm(nn.Module):
    """Hugging Face's RMSNorm, written out in Python as transformers does."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.rand(size) + 0.5), eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


class GemmaRMSNorm(LlamaRMSNorm):
    """Scales by ``1 + weight``: not ``F.rms_norm``, so it must stay as it is."""

    def forward(self, x):
        return (1 + self.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def test_functional_norms_captures_one_rms_norm_and_restores_forward():
    net = nn.Sequential(nn.Linear(4, 8), LlamaRMSNorm(8), nn.Linear(8, 8), GemmaRMSNorm(8))
    with functional_norms(net):
        gm = fx.symbolic_trace(net)
        assert "forward" in vars(net[1]) and "forward" not in vars(net[3])
    (node,) = [n for n in gm.graph.nodes if n.target is F.rms_norm]
    assert node.kwargs["weight"].op == "get_attr" and node.kwargs["weight"].target == "1.weight"
    assert "forward" not in vars(net[1])  # the class's forward again
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), net(x))
    with pytest.raises(RuntimeError, match="boom"), functional_norms(net):
        raise RuntimeError("boom")
    assert "forward" not in vars(net[1])


def test_hf_rms_norm_called_as_a_leaf_is_known_by_name():
    net = nn.Sequential(nn.Linear(4, 8), LlamaRMSNorm(8), nn.Linear(8, 2))
    (fam,) = _families(net, torch.randn(3, 4), kinds=("neuron",), leaf_modules=(LlamaRMSNorm,), strict=True)
    assert fam.read_by_norm and ("1.weight", 0, "out") in _stripes(fam)


def test_norms_record_what_compaction_must_fix():
    graph, _ = channel_graph(randomize_norms(GPT(norm=nn.RMSNorm)), (IDS,))
    site = graph.norms["blocks.0.ln1"]
    assert (site.kind, site.weight, site.eps_attr) == ("rms", "blocks.0.ln1.weight", "eps")
