"""Rules for attention: heads meet in ``q @ kᵀ`` and ``attn @ v``, or in ``F.scaled_dot_product_attention``.

The projections' outputs are split into heads by a reshape (:mod:`~torchslim.structure.heads_layout`); the
ops inside a head (rotary embeddings, scaling, a mask, softmax over the keys) keep the heads along their
dim, and the products unite head ``h`` of q, of k and of v: one member of one class, of kind ``"head"``,
with the output projection's columns that read head ``h``. With grouped-query attention (``enable_gqa``,
or k and v repeated by HF's ``repeat_kv``: ``expand`` and ``reshape``) query head ``i`` reads key/value
head ``i // g``: a member is one key/value head and its ``g`` query heads.

When is a head removable (compaction: its producers are silent, or its readers are zero)? Its output is
``softmax(q_h k_hᵀ) v_h``: zero when v's rows are zero, whatever q and k hold, but not when only q's
and k's rows are zero (uniform attention outputs the mean of v). So where a head's q and k channels are
seen to feed nothing but this product's attention weights, their rows become ``"score"`` stripes: cut and
regularized with the head, not part of "silent" (v's ``"out"`` rows are), and the ops on the way to the
weights (softmax, a mask), which do not map 0 to 0, no longer count against zero-preservation. Elsewhere
they stay ``"out"``, and silent needs q, k and v zero: still exact.

``nn.MultiheadAttention`` (packed ``in_proj``) is one op: head ``h`` is rows ``h·D…`` of each of its q, k and v
blocks of ``in_proj_weight`` and ``in_proj_bias`` and columns ``h·D…`` of ``out_proj``; its inputs' channels are
the columns of ``in_proj_weight`` (removable where q, k and v are one tensor), its output a new space written by
``out_proj``. Its class computes ``head_dim = embed_dim // num_heads``, so it cannot run with fewer heads or a
narrower width: compaction swaps it for a :class:`~torchslim.layers.NarrowMultiheadAttention` (the same
parameters, call and returns). Per-head masks (``(B·H, L, S)``) or attention weights that are used pin the heads.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from torchslim.layers import NarrowMultiheadAttention
from torchslim.structure.capture import tensor_shapes
from torchslim.structure.groups import Stripe
from torchslim.structure.heads_layout import heads
from torchslim.structure.layout import Channels, Segment, all_channels
from torchslim.structure.op import Elementwise, Op, OpRule
from torchslim.structure.tensor_rules import broadcast_over


def _arg(op: Op, i: int, name: str, default: Any = None) -> Any:
    args = op.node.args
    return args[i] if len(args) > i else op.node.kwargs.get(name, default)


def _none(arg: Any) -> bool:
    """Whether ``arg`` is None, or a node that was None in the traced run (an ``attn_mask=None`` argument)."""
    return arg is None or (isinstance(arg, fx.Node) and arg.meta.get("type") is type(None))


def unite_entries(op: Op, a: Channels, b: Channels) -> bool:
    """Entry ``i`` of ``a``'s channel dim goes with entry ``i`` of ``b``'s (head ``h`` of q with head ``h`` of k).

    Each must be one whole space, ``w`` entries per member; query heads one entry each and key heads
    repeated ``g`` times (``w = g``) unite in blocks of ``g`` query heads. False (nothing united) otherwise.
    """
    if a == b:
        return True
    if len(a.segs) != 1 or len(b.segs) != 1:
        return False
    p, q, graph = a.segs[0], b.segs[0], op.walk.graph
    if any(s.offset or s.lo or s.hi != graph.spaces[s.space].size or s.stride != s.width for s in (p, q)) \
            or p.hi * p.width != q.hi * q.width:
        return False
    graph.union(p.space, q.space, groups=p.hi * p.width // math.lcm(p.width, q.width))
    return True


def matmul(op: Op) -> None:
    """``a @ b``: channels along a batch dim of both (heads) unite; a score product is remembered for its ``@ v``.

    One operand with channels keeps them where they are not contracted: rows of ``a``, columns of ``b``
    (single-head attention's ``att @ v``), or a batch dim the other operand broadcasts over.
    """
    a, b = op.node.args[:2]
    ca, cb, sa, sb = op.channels(a), op.channels(b), op.shape(a), op.shape(b)
    if ca is None and cb is None:
        return
    rank = len(op.shape())
    if ca is not None and cb is not None:
        if len(sa) == len(sb) and ca.dim == cb.dim < len(sa) - 2:
            score = _score_of(op, a, ca)
            if score is not None:
                settle_scores(op, score, [cb])
            if unite_entries(op, ca, cb):
                if score is None:
                    heads(op.walk).scores[op.node] = (ca, cb)
                op.output(cb if score is not None else ca)
                return
    elif ca is not None and (ca.dim == len(sa) - 2 or ca.dim < len(sa) - 2 and broadcast_over(op, ca, a, b)):
        op.output(ca.moved_to(rank - len(sa) + ca.dim))  # rows of a (or a batch dim b broadcasts over)
        return
    elif cb is not None and (cb.dim == len(sb) - 1 or cb.dim < len(sb) - 2 and broadcast_over(op, cb, b, a)):
        op.output(cb.moved_to(rank - len(sb) + cb.dim))  # columns of b: attention weights mix tokens, not them
        return
    op.unknown("a matmul over the channels")


def _score_of(op: Op, node: fx.Node, chan: Channels) -> tuple[Channels, Channels] | None:
    """The ``(q, k)`` heads of the score product that ``node`` comes from (through softmax, a mask...), or None."""
    scores = heads(op.walk).scores
    for _ in range(16):
        if node in scores:
            return scores[node]
        before = [p for p in node.all_input_nodes if op.channels(p) == chan]
        if len(before) != 1:
            return None
        node = before[0]
    return None


def sdpa(op: Op) -> None:
    """``F.scaled_dot_product_attention(q, k, v)``: head ``h`` of q, k and v unite; the output carries v's heads.

    With ``enable_gqa=True`` and ``H = g·H_kv``, query head ``i`` reads key/value head ``i // g``.
    """
    q, k, v = (_arg(op, i, name) for i, name in enumerate(("query", "key", "value")))
    cq, ck, cv = op.channels(q), op.channels(k), op.channels(v)
    mask = _arg(op, 3, "attn_mask")
    if cq is None and ck is None and cv is None and op.channels(mask) is None:
        return
    if cq is None or ck is None or cv is None or not cq.dim == ck.dim == cv.dim < len(op.shape(q)) - 2:
        op.unknown("scaled_dot_product_attention with channels other than heads in q, k and v")
        return
    if not _none(mask) and (op.channels(mask) is not None or not broadcast_over(op, cq, q, mask)):
        op.unknown("scaled_dot_product_attention with a mask along the heads (a bias per head)")
        return
    n_q, n_kv = op.shape(q)[cq.dim], op.shape(k)[ck.dim]
    if n_q != n_kv and not (_arg(op, 7, "enable_gqa", False) and n_q % n_kv == 0):
        op.unknown("scaled_dot_product_attention with different head counts")
        return
    ck, cv = ck.widen(n_q // n_kv), cv.widen(n_q // n_kv)
    settle_scores(op, (cq, ck), [cv])
    if not (unite_entries(op, cq, ck) and unite_entries(op, cq, cv)):
        op.unknown("scaled_dot_product_attention of heads laid out differently")
        return
    op.output(cv.moved_to(cq.dim))


def settle_scores(op: Op, score: Sequence[Channels], value: Sequence[Channels]) -> None:
    """q's and k's rows become ``"score"`` stripes where they feed only this product's weights (see the module).

    Runs before q and k are united with v: their classes must still be apart from v's, hold no reader
    (``"in"`` stripes), and every tensor that carries them must be used by ops already walked or by this one.
    """
    graph = op.walk.graph
    roots = {graph.find(seg.space) for c in score for seg in c.segs}
    value_roots = {graph.find(seg.space) for c in value for seg in c.segs}
    spaces = {i for i in range(len(graph.spaces)) if graph.find(i) in roots}
    value_out = any(st.role == "out" for i in range(len(graph.spaces)) if graph.find(i) in value_roots
                    for st in graph.spaces[i].stripes)
    if roots & value_roots or not value_out \
            or any(st.role == "in" for i in spaces for st in graph.spaces[i].stripes) or not _feeds_only(op, spaces):
        return
    for i in spaces:
        space = graph.spaces[i]
        space.zero_preserving = True
        space.stripes = [dataclasses.replace(st, role="score") if st.role == "out" else st for st in space.stripes]


def _feeds_only(op: Op, spaces: set[int]) -> bool:
    """Whether every tensor carrying ``spaces`` is used only by ops already walked, or by ``op``."""
    walk, state = op.walk, heads(op.walk)
    here = state.order[op.node]
    layouts = [*walk.info.items(), *walk.pieces.items(), *((n, list(s.parts)) for n, s in state.stacked.items())]
    carriers = {n for n, layout in layouts if any(seg.space in spaces for c in all_channels(layout) for seg in c.segs)}
    return all(u is op.node or state.order.get(u, here) < here for n in carriers for u in n.users)


def softmax(op: Op) -> None:
    """Softmax over another dim than the channels (attention over the keys) keeps them; it maps 0 to non-0."""
    chan = op.channels(op.input)
    if chan is None:
        return
    dim = op.module.dim if op.module is not None else _arg(op, 1, "dim")
    if not isinstance(dim, int) or dim % len(op.shape()) == chan.dim:
        op.unknown("softmax over the channels")
        return
    op.output(chan, zero_preserving=False)


def masked_fill(op: Op) -> None:
    """``x.masked_fill(mask, value)`` with a mask broadcast over the channels (a causal mask) keeps them."""
    chan, mask = op.channels(op.input), _arg(op, 1, "mask")
    if chan is None and op.channels(mask) is None:
        return
    if chan is None or op.channels(mask) is not None or not broadcast_over(op, chan, op.input, mask):
        op.unknown("masked_fill with a mask along the channels")
        return
    op.output(chan, zero_preserving=_arg(op, 2, "value") == 0)


def add_mask(op: Op) -> None:
    """timm's ``maybe_add_mask(scores, mask)``: ``scores`` (+ a mask broadcast over the heads) keeps the heads."""
    chan, mask = op.channels(op.input), _arg(op, 1, "attn_mask")
    if chan is None and op.channels(mask) is None:
        return
    if _none(mask):
        op.output(chan)
    elif chan is None or op.channels(mask) is not None or not broadcast_over(op, chan, op.input, mask):
        op.unknown("an attention mask along the heads")
    else:
        op.output(chan, zero_preserving=False)


def _mask_only(op: Op) -> None:
    """timm's ``resolve_self_attn_mask(N, attn, mask, is_causal)``: a mask from ``attn``'s shape, no channels."""


def expand(op: Op) -> None:
    """``expand``/``expand_as`` of other dims (``repeat_kv``'s new dim of ``g`` copies) keeps the channels."""
    chan, src, dst = op.channels(op.input), op.shape(op.input), op.shape()
    if chan is None:
        return
    new = chan.dim + len(dst) - len(src)
    if dst[new] != src[chan.dim]:
        op.unknown("expand of the channels")
        return
    op.output(chan.moved_to(new))


def unsqueeze(op: Op) -> None:
    """``unsqueeze(d)``: a new dim before the channels moves them by one."""
    chan = op.channels(op.input)
    if chan is None:
        return
    d = _arg(op, 1, "dim") % len(op.shape())
    op.output(chan.moved_to(chan.dim + (d <= chan.dim)))


def repeat_interleave(op: Op) -> None:
    """``repeat_interleave(x, g, dim)`` with an int ``g``: along the channels each entry becomes ``g`` (GQA)."""
    chan, g, dim = op.channels(op.input), _arg(op, 1, "repeats"), _arg(op, 2, "dim")
    if chan is None:
        return
    if not isinstance(g, int) or not isinstance(dim, int):
        op.unknown("repeat_interleave without an int count and dim")
        return
    op.output(chan.widen(g) if dim % len(op.shape()) == chan.dim else chan)


def unbind(op: Op) -> None:
    """``unbind(d)``: each slice along ``d`` carries the channels, or its part of a fused projection."""
    x, d, shapes = op.input, _arg(op, 1, "dim", 0), tensor_shapes(op.node)
    stacked, chan = heads(op.walk).stacked.get(x), op.channels(x)
    if shapes is None or (stacked is None and chan is None):
        return
    d %= len(op.shape(x))
    if stacked is not None and d == stacked.dim:
        op.walk.pieces[op.node] = [stacked.take(i) for i in range(len(shapes))]
    elif stacked is None and d != chan.dim:
        op.walk.pieces[op.node] = [chan.moved_to(chan.dim - (d < chan.dim))] * len(shapes)
    else:
        op.unknown("unbind of the channels")


def multihead_attention(op: Op) -> None:
    """``nn.MultiheadAttention`` (and the :class:`~torchslim.layers.NarrowMultiheadAttention` that replaces it): a
    space of heads inside it, its inputs' channels read by ``in_proj_weight``, a new output space."""
    mod, name = op.module, op.path
    q, k, v = (_arg(op, i, n) for i, n in ((0, "query"), (1, "key"), (2, "value")))
    if getattr(mod, "in_proj_weight", None) is None or getattr(mod, "bias_k", None) is not None \
            or getattr(mod, "add_zero_attn", False):
        op.unknown(f"{op.describe()} with separate q, k, v projections, bias_k/bias_v or add_zero_attn")
        return
    h, d = mod.num_heads, mod.head_dim
    inner = h * d
    mask = _arg(op, 5, "attn_mask")
    weights_used = any(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 1 and u.users
                       for u in op.node.users)
    why = ("its attention weights are used (an average or a map over the heads)" if weights_used else
           "a per-head attention mask (B·H, L, S)" if not _none(mask) and len(op.shape(mask) or ()) == 3 else None)
    heads_space = op.walk.graph.new(h, fixed=f"{op.describe()} at {op.where()}: {why}" if why else None)
    space = op.walk.graph.spaces[heads_space]
    space.producers.append(name)
    space.producer_kind.add("head")
    for param in ("in_proj_weight", "in_proj_bias"):
        if getattr(mod, param, None) is not None:
            space.stripes += [Stripe(f"{name}.{param}", 0, d, role=role, offset=i * inner)
                              for i, role in enumerate(("score", "score", "out"))]
    space.stripes.append(Stripe(f"{name}.out_proj.weight", 1, d, role="in"))
    last = len(op.shape(q) or (0,)) - 1
    inputs = {n: op.channels(n) for n in (q, k, v)}
    for node, chan in inputs.items():
        if chan is None:
            continue
        if chan.dim != last or len(inputs) > 1:
            op.fix(chan, f"{op.describe()} at {op.where()} reads " + (
                "a dimension other than the features" if chan.dim != last else
                "different query, key and value tensors with the same columns of in_proj_weight"))
        else:
            op.attach(chan, f"{name}.in_proj_weight", 1, "in")
    out = op.walk.graph.new(mod.embed_dim)
    space = op.walk.graph.spaces[out]
    space.producers.append(name)
    space.producer_kind.add("neuron")
    space.stripes += [Stripe(f"{name}.out_proj.weight", 0)] + (
        [Stripe(f"{name}.out_proj.bias", 0)] if mod.out_proj.bias is not None else [])
    op.walk.pieces[op.node] = [Channels(last, (Segment(out, 0, mod.embed_dim),)), ()]


_KEEP = Elementwise()
_ATEN = torch.ops.aten

# aten forms that structure/aten_rules.py does not map to a function's rule (it maps sdpa, matmul, expand, ...)
RULES: dict[Any, OpRule] = {
    F.scaled_dot_product_attention: sdpa,
    operator.matmul: matmul, torch.matmul: matmul, "matmul": matmul,
    F.softmax: softmax, torch.softmax: softmax, "softmax": softmax, nn.Softmax: softmax,
    _ATEN.softmax.int: softmax, _ATEN._softmax.default: softmax,
    "masked_fill": masked_fill, torch.masked_fill: masked_fill, _ATEN.masked_fill.Scalar: masked_fill,
    "expand": expand, "expand_as": expand,
    "unsqueeze": unsqueeze, torch.unsqueeze: unsqueeze,
    "repeat_interleave": repeat_interleave, torch.repeat_interleave: repeat_interleave,
    "unbind": unbind, torch.unbind: unbind, _ATEN.unbind.int: unbind,
    operator.neg: _KEEP, torch.neg: _KEEP, "neg": _KEEP, "type": _KEEP, "to": _KEEP, "float": _KEEP, "type_as": _KEEP,
    nn.MultiheadAttention: multihead_attention, NarrowMultiheadAttention: multihead_attention,
    # timm wraps these for fx (one call each): by name, as tracing does not import timm
    "timm.layers.attention.maybe_add_mask": add_mask, "timm.layers.attention.resolve_self_attn_mask": _mask_only,
}
