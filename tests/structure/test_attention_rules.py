"""The ``"head"`` kind: one member per attention head (per key/value head with grouped-query attention).

For each way of writing attention (``attention_nets``): the heads are found by fx, a head's group holds
its q, k, v rows and its output-projection columns, q and k rows are ``"score"`` stripes (they do not
decide whether a head is silent), and the splits the compact model could not repeat are pinned, with
the reason in strict mode.
"""

from __future__ import annotations

import pytest
import torch
from attention_nets import (
    BUILDERS,
    BorrowedWidth,
    D,
    E,
    Grouped,
    H,
    QueryReadTwice,
    Separate,
    T,
    Torch,
    parts,
)

from torchslim import UnknownOpWarning, compact, structures
from torchslim.errors import UnsupportedOperation

X = torch.randn(2, T, E)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_one_member_per_head_with_grouped_queries_per_key_value_head(name):
    model = BUILDERS[name]().eval()
    groups = structures(model, X, kinds=("head",), strict=True, capture="fx")
    members = H // getattr(model, "num_key_value_groups", 1)
    assert len(groups) == members and {g.kind for g in groups} == {"head"}
    fam = groups[0].family
    roles = {(s.param, s.offset, s.role) for s in fam.stripes if s.param.endswith("weight")}
    weights = {part: next(n for n, p in model.named_parameters() if p is w) for part, (w, _) in parts(model).items()}
    firsts = {part: first for part, (_, first) in parts(model).items()}
    assert roles == {(weights["q"], firsts["q"], "score"), (weights["k"], firsts["k"], "score"),
                     (weights["v"], firsts["v"], "out"), (weights["o"], 0, "in")}


def test_a_head_is_its_rows_of_q_k_v_and_its_columns_of_the_output():
    model = Separate().eval()
    head = structures(model, X, kinds=("head",), strict=True)[2]
    rows = torch.arange(2 * D, 3 * D)
    assert {(name, dim): ix.tolist() for name, dim, ix in head.slices} == {
        (f"{p}.{w}", 1 if p == "o" else 0): rows.tolist() for p in "qkvo" for w in ("weight", "bias")
        if not (p == "o" and w == "bias")}
    assert head.numel() == 3 * (D * E + D) + E * D


def test_grouped_query_member_holds_a_key_value_head_and_its_query_heads():
    model = Grouped(kv_heads=2).eval()
    kv = structures(model, X, kinds=("head",), strict=True)[1]
    slices = {name: ix.tolist() for name, _, ix in kv.slices}
    g = H // 2
    assert slices == {"q_proj.weight": list(range(g * D, 2 * g * D)), "k_proj.weight": list(range(D, 2 * D)),
                      "v_proj.weight": list(range(D, 2 * D)), "o_proj.weight": list(range(g * D, 2 * g * D))}


def test_heads_and_neurons_are_apart():
    """The output projection's neurons are their own family; the heads' kind wins over the projections'."""
    kinds = {g.kind for g in structures(torch.nn.Sequential(Separate(), torch.nn.Linear(E, E)).eval(), X,
                                        kinds=("head", "neuron"), strict=True)}
    assert kinds == {"head", "neuron"}


def test_q_read_by_another_layer_stays_a_producer():
    """Zero q rows change what the other reader sees, so q and k rows keep deciding silence with v's."""
    groups = structures(QueryReadTwice().eval(), X, kinds=("head",), strict=True)
    assert len(groups) == H
    assert {s.role for s in groups[0].family.stripes if s.param.startswith(("q.", "k."))} == {"out"}


def test_a_head_width_taken_from_the_block_width_is_pinned_with_the_reason():
    model = BorrowedWidth().eval()
    with pytest.raises(UnsupportedOperation, match="width is computed from another tensor"):
        structures(model, X, kinds=("head",), strict=True, capture="fx")
    with pytest.warns(UnknownOpWarning, match="heads"):
        assert structures(model, X, kinds=("head",), capture="fx") == []


def test_a_constant_head_count_is_pinned():
    class Literal(Separate):
        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (f(x).view(b, t, 4, 8).transpose(1, 2) for f in (self.q, self.k, self.v))
            return self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))

    with pytest.raises(UnsupportedOperation, match="4 heads written as a constant"):
        structures(Literal().eval(), X, kinds=("head",), strict=True)


class CrossOrMasked(Torch):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.how == "cross":
            return self.out(self.attn(h, x, x, need_weights=False)[0])
        if self.how == "weights":
            y, w = self.attn(h, h, h)
            return self.out(y) + w.sum(-1, keepdim=True)
        mask = torch.zeros(x.shape[0] * H, T, T)  # per head
        return self.out(self.attn(h, h, h, attn_mask=mask, need_weights=False)[0])


@pytest.mark.parametrize("how", ["weights", "per_head_mask"])
def test_multihead_attention_heads_are_pinned_where_their_count_shows(how):
    groups = structures(CrossOrMasked(how).eval(), X, kinds=("head", "neuron"))
    assert {g.kind for g in groups} == {"neuron"} and len(groups) == 2 * E  # inp's and out_proj's rows, no heads


def test_multihead_attention_across_tensors_keeps_their_channels_and_its_heads():
    groups = structures(CrossOrMasked("cross").eval(), X, kinds=("head", "neuron"), strict=True)
    kinds = [g.kind for g in groups]  # out_proj's rows, but not inp's: in_proj's columns read q and k, v alike
    assert kinds.count("head") == H and len(kinds) == H + E and not any(g.name.startswith("inp") for g in groups)


def test_hf_eager_attention_adds_a_computed_mask_and_keeps_its_heads(one_thread):
    """LLaMA with ``attn_implementation="eager"``: ``softmax(q·kᵀ·s + causal_mask) · v``, the mask ``(B, 1, T, T)``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=48, vocab_size=64, max_position_embeddings=16, use_cache=False,
                                      attn_implementation="eager")
    torch.manual_seed(0)
    model, ids = transformers.LlamaForCausalLM(config).eval(), torch.randint(0, 64, (1, 8))
    assert model.config._attn_implementation == "eager"
    groups = structures(model, ids, kinds=("head",), strict=True)
    assert len(groups) == 2                          # key/value heads, each with its 2 query heads
    groups[1].zero_()
    small = compact(model, ids, strict=True)
    attn = small.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.o_proj.in_features) == (16, 8, 16)
    fresh = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(small(fresh).logits, model(fresh).logits, rtol=1e-5, atol=1e-5)
