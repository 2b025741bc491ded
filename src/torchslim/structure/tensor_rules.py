"""Built-in rules for tensor operations: add, mul, cat, split/chunk, indexing, permute, mean, reshape, pad,
pixel (un)shuffle."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from torchslim.structure.capture import tensor_shapes
from torchslim.structure.heads_layout import (
    fold,
    heads,
    is_head,
    merge_reason,
    rewritten_split,
    set_stacked,
    split_heads,
)
from torchslim.structure.layout import Channels, Segment, Stack
from torchslim.structure.op import Op
from torchslim.structure.param_operands import parameter_dim
from torchslim.structure.shuffle import shuffle


def _name(op: Op) -> str:
    return getattr(op.node.target, "__name__", op.node.target)


def add(op: Op) -> None:
    """``a + b`` of same-shape tensors unites their channels (a residual trunk); ``x + scalar`` passes them.

    Broadcast operands whose channel dims line up from the right (token ``(B, T, C)`` plus position
    ``(T, C)`` embeddings) unite too. A parameter added to the channels (``x + self.pos_embed``, timm's
    ViT) writes them: its entries along the channel dim are ``"out"`` stripes (0 where the channel is
    silent); one broadcast over the channels (size 1 there) maps a zero channel to non-zero.
    """
    operands = op.node.args[:2]
    chans = [op.channels(a) for a in operands if isinstance(a, fx.Node)]
    tensors = [a for a in operands if isinstance(a, fx.Node) and op.shape(a) is not None]
    if len(tensors) == 2 and all(c is not None for c in chans) \
            and op.shape(tensors[0]) == op.shape(tensors[1]) and op.unite(*chans):
        op.output(chans[0])
        return
    if len(tensors) == 1 and chans and chans[0] is not None:  # x + scalar
        op.output(op.channels(tensors[0]), zero_preserving=False)
        return
    if len(tensors) == 2 and (_add_broadcast(op, *tensors) or _add_parameter(op, *tensors)
                              or _add_computed(op, *tensors)):
        return
    if len(tensors) == 2 and all(c is not None for c in chans) and op.shape(tensors[0]) == op.shape(tensors[1]) \
            and chans[0].dim == chans[1].dim and any(_pinned(op, c) for c in chans):
        # channel k of the sum needs channel k of both: one operand keeps all its channels, so does the other
        op.fix(chans[0], f"added to pinned channels at {op.where()}")
        op.fix(chans[1], f"added to pinned channels at {op.where()}")
        op.output(chans[0])
        return
    op.unknown(f"{_name(op)} of these operands")


def _add_broadcast(op: Op, a: fx.Node, b: fx.Node) -> bool:
    """Two channel operands of different shapes whose channel dims line up from the right: unite them."""
    ca, cb, sa, sb = op.channels(a), op.channels(b), op.shape(a), op.shape(b)
    if ca is None or cb is None or len(sa) - ca.dim != len(sb) - cb.dim or sa[ca.dim] != sb[cb.dim]:
        return False
    if not op.unite(ca, cb.moved_to(ca.dim)):
        return False
    op.output(ca.moved_to(len(op.shape()) - (len(sa) - ca.dim)))
    return True


def _add_parameter(op: Op, a: fx.Node, b: fx.Node) -> bool:
    """One operand carries channels, the other is a parameter: it writes them (or is broadcast over them)."""
    if (op.channels(a) is None) == (op.channels(b) is None):
        return False
    x, other = (a, b) if op.channels(a) is not None else (b, a)
    chans, rank = op.channels(x), len(op.shape())
    out = chans.moved_to(chans.dim + rank - len(op.shape(x)))
    found = parameter_dim(op, out, other)
    if found is None:
        return False
    param, dim = found
    if dim is not None:
        op.attach(out, str(param.target), dim, "out")
    op.output(out, zero_preserving=dim is not None)
    return True


def _add_computed(op: Op, a: fx.Node, b: fx.Node) -> bool:
    """One operand carries channels, the other is computed without them and broadcast over them (size 1 at the
    channel dim: an eager attention's causal or padding mask ``(B, 1, T, T)`` on the scores ``(B, H, T, T)``):
    the channels pass, and a zero channel becomes the mask's values. One as wide as the channels without
    carrying them (a bias per head computed from constants) is not followed: the compact model would add it whole.
    """
    if (op.channels(a) is None) == (op.channels(b) is None):
        return False
    x, other = (a, b) if op.channels(a) is not None else (b, a)
    chans = op.channels(x)
    if not broadcast_over(op, chans, x, other):
        return False
    op.output(chans.moved_to(chans.dim + len(op.shape()) - len(op.shape(x))), zero_preserving=False)
    return True


def _pinned(op: Op, chans: Channels) -> bool:
    """Whether every channel of ``chans`` is pinned (each space is united with a fixed one)."""
    graph = op.walk.graph
    fixed = {graph.find(i) for i, space in enumerate(graph.spaces) if space.fixed}
    return all(graph.find(seg.space) in fixed for seg in chans.segs)


def scale(op: Op) -> None:
    """``x * scalar`` keeps channels apart; ``x * gate`` with a per-channel gate unites them.

    A factor without channels that is broadcast over them (size 1 at the channel dim, aligned from the
    right: rotary ``cos``/``sin`` of shape ``(1, 1, T, D)`` on heads ``(B, H, T, D)``) keeps them too, as
    does ``x / t``; ``t / x`` does not map 0 to 0. A parameter with one entry per channel (a layer scale:
    ``x * self.gamma``, γ of shape ``(C,)`` or ``(C, 1, 1)``, or ``gamma.view(1, -1, 1, 1)``) writes them:
    ``γ_k = 0`` zeroes channel ``k``, so its entries are ``"out"`` stripes, cut with the channel.
    """
    tensors = [a for a in op.node.args[:2] if isinstance(a, fx.Node) and op.shape(a) is not None]
    chans = [op.channels(t) for t in tensors]
    if len(tensors) == 1 and chans[0] is not None:
        op.output(chans[0])
        return
    if len(tensors) == 2 and all(c is not None for c in chans):
        (a, b), (sa, sb) = chans, (op.shape(t) for t in tensors)
        if len(sa) == len(sb) and a.dim == b.dim and sa[a.dim] == sb[b.dim] \
                and (op.unite(a, b) or _unite_pieces(op, *tensors)):
            op.output(op.channels(tensors[0]))  # a zero channel of either factor is zero in the product
            return
    if len(tensors) == 2 and (chans[0] is None) != (chans[1] is None):
        x, other = (tensors[0], tensors[1]) if chans[0] is not None else (tensors[1], tensors[0])
        divisor = op.node.target in (operator.truediv, torch.div, "div") and x is not op.node.args[0]
        if not divisor and broadcast_over(op, op.channels(x), x, other):
            op.output(op.channels(x).moved_to(op.channels(x).dim + len(op.shape()) - len(op.shape(x))))
            return
        if not divisor and _scale_parameter(op, x, other):
            return
    op.unknown(f"{_name(op)} of two tensors")


def _scale_parameter(op: Op, x: fx.Node, other: fx.Node) -> bool:
    """``x * γ`` with γ a parameter of one entry per channel (a layer scale): γ's entries write the channels.

    A parameter of one entry expanded over the channels scales them all alike: they pass.
    """
    chans = op.channels(x)
    out = chans.moved_to(chans.dim + len(op.shape()) - len(op.shape(x)))
    found = parameter_dim(op, out, other)
    if found is None:
        return False
    if found[1] is not None:
        op.attach(out, str(found[0].target), found[1], "out")
    op.output(out)  # 0 · γ_k = 0
    return True


def _unite_pieces(op: Op, x: fx.Node, y: fx.Node) -> bool:
    """``act(gate) * up`` with ``gate, up = fc(x).chunk(2, -1)`` (a fused gated MLP): two pieces of one space.

    The space is folded at the pieces' size (:func:`~torchslim.structure.heads_layout.fold`) and the two parts
    are united, so a member is row ``k`` of the gate, row ``n + k`` of the up projection and the reader's
    column ``k``; the chunk's tie then keeps both halves as wide.
    """
    a, b, graph = op.channels(x), op.channels(y), op.walk.graph
    if len(a.segs) != 1 or len(b.segs) != 1:
        return False
    p, q = a.segs[0], b.segs[0]
    n, size = p.hi - p.lo, graph.spaces[p.space].size
    if p.space != q.space or p.lo == q.lo or q.hi - q.lo != n or size % n or p.lo % n or q.lo % n \
            or any((s.width, s.stride) != (1, 1) for s in (p, q)):
        return False
    if fold(op, p.space, size // n) is None:
        return False
    return op.unite(op.channels(x), op.channels(y))


def broadcast_over(op: Op, chans: Channels, x: fx.Node, other: fx.Node) -> bool:
    """Whether ``other`` (no channels) has size 1 at ``x``'s channel dim, or no such dim, aligned from the right."""
    if op.shape(other) is None:
        return False
    at = len(op.shape(other)) - (len(op.shape(x)) - chans.dim)
    return at < 0 or op.shape(other)[at] == 1


def cat(op: Op) -> None:
    """Along the channels, each operand's segments move by the entries before it; along another dim they stay."""
    tensors = op.node.args[0] if op.node.args else op.node.kwargs.get("tensors")
    dim = op.node.args[1] if len(op.node.args) > 1 else op.node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        op.unknown("cat of these operands")
        return
    dim = dim % len(op.shape())
    chans = [op.channels(t) for t in tensors]
    if all(c is not None and c.dim == dim for c in chans):
        starts = [0]
        for t in tensors[:-1]:
            starts.append(starts[-1] + op.shape(t)[dim])
        op.output(Channels(dim, tuple(seg.moved(at) for c, at in zip(chans, starts) for seg in c.segs)))
    elif all(c is not None and c == chans[0] for c in chans):
        op.output(chans[0])  # along another dim (batch, space): the channels stay as they are
    elif not _cat_parameters(op, tensors, chans, dim):
        op.unknown("cat of these operands")


def _cat_parameters(op: Op, tensors: list[fx.Node], chans: list[Channels | None], dim: int) -> bool:
    """``cat([cls_token.expand(B, -1, -1), x], dim=1)``: along another dim than the channels, parameters join
    them, their entries along the channel dim written as ``"out"`` stripes (a class token, timm's ViT)."""
    carried = [c for c in chans if c is not None]
    if not carried or any(c != carried[0] for c in carried) or carried[0].dim == dim:
        return False
    found = [parameter_dim(op, carried[0], t) for t, c in zip(tensors, chans) if c is None]
    if any(f is None for f in found):
        return False
    for param, dim in found:
        if dim is not None:
            op.attach(carried[0], str(param.target), dim, "out")
    op.output(carried[0], zero_preserving=all(dim is not None for _, dim in found))
    return True


def split(op: Op) -> None:
    """``split``/``chunk``/``tensor_split`` into pieces: each piece carries its range of the channels.

    The compact model runs the same call on fewer channels. ``chunk(n)`` computes its pieces' size
    from the channels it gets, so it records a tie (each piece keeps ``ceil(C'/n)``, see
    :mod:`torchslim.surgery.ties`). Split sizes are constants in the user's forward (``split(x, w)``,
    ``split(x, [a, b])``; res2net's ``torch.split(x, self.width, 1)``), so every piece must keep
    exactly its size: the split input's channels are pinned. Except where compaction rewrites the size:
    GPT-2's fused ``c_attn(x).split(self.split_size, dim=2)`` into q, k, v (``sync_attention``) records a
    ``"split"`` tie instead (every piece keeps as many).
    """
    chan, shapes = op.channels(op.input), tensor_shapes(op.node)
    if chan is None or shapes is None:
        return
    dim = op.node.args[2] if len(op.node.args) > 2 else op.node.kwargs.get("dim", 0)
    dim = dim % len(shapes[0])
    if dim != chan.dim:
        op.walk.pieces[op.node] = [chan] * len(shapes)
        return
    pieces, at = [], 0
    for shape in shapes:
        pieces.append(chan.slice(at, at + shape[dim]))
        at += shape[dim]
    chunks = op.node.args[1] if len(op.node.args) > 1 else op.node.kwargs.get("chunks")
    sizes = tuple(shape[dim] for shape in shapes)
    if any(p is None for p in pieces):
        op.unknown("a split inside a channel's entries")
    elif op.node.target in (torch.chunk, "chunk", torch.ops.aten.chunk.default) and len(shapes) == chunks:
        op.walk.graph.ties.append(("chunk", chan, sizes))  # the pieces' sizes must still come out right
    elif len(set(sizes)) == 1 and len(sizes) > 1 and rewritten_split(op, sizes[0]):
        op.walk.graph.ties.append(("split", chan, sizes))
    else:
        op.fix(chan, f"{_name(op)} into pieces of fixed sizes {list(sizes)} at {op.where()}: "
                     "the compact model cuts the same sizes")
    op.walk.pieces[op.node] = pieces


def getitem(op: Op) -> None:
    """``t[i]`` of a split or an RNN's outputs, ``h_n[layer]`` of an RNN state, ``x[..]`` keeping the channels,
    ``qkv[i]`` of a fused projection's parts (``(3, B, H, T, D)``, see :mod:`~torchslim.structure.heads_layout`)."""
    x, index, walk = op.input, op.node.args[1], op.walk
    stacked = heads(walk).stacked.get(x)
    if stacked is not None:
        if isinstance(index, int) and stacked.dim == 0:
            op.output(stacked.take(index))
        else:
            op.unknown("indexing a fused projection other than by its part")
    elif x in walk.pieces:
        piece = walk.pieces[x][index] if isinstance(index, int) else None
        if isinstance(piece, Channels):
            op.output(piece)
        elif isinstance(piece, Stack):
            walk.stacks[op.node] = piece
        elif isinstance(piece, list):
            walk.pieces[op.node] = piece
        elif piece != ():  # () carries no channels (nn.MultiheadAttention's weights)
            op.unknown("indexing a split")
    elif x in walk.stacks:
        if isinstance(index, int) and op.shape() is not None and len(op.shape()) == 2:
            op.output(walk.stacks[x].chans[index])
        else:
            op.unknown("indexing an RNN state other than by layer")
    elif op.channels(x) is not None:
        _index(op, op.channels(x), index)
    else:
        op.unknown()


def _index(op: Op, chan: Channels, index: Any) -> None:
    """``x[..]`` that keeps every channel: ints and slices on other dims (``out[:, -1]``, ``x[..., :half]``),
    ``None`` for a new dim (``k[:, :, None]``)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items) \
            or sum(i is Ellipsis for i in items) > 1:
        op.unknown("indexing with tensors")
        return
    if any(i is Ellipsis for i in items):
        at = next(j for j, i in enumerate(items) if i is Ellipsis)
        explicit = sum(i is not None and i is not Ellipsis for i in items)
        items[at:at + 1] = [slice(None)] * (len(op.shape(op.input)) - explicit)
    read = [i for i in items if i is not None]  # one per input dim, in order
    if len(read) > chan.dim and read[chan.dim] != slice(None):
        op.unknown("indexing into the channels")
        return
    dim_in = out = 0
    for i in items:  # the output dim of the channels: new dims before them count, dropped ones do not
        if dim_in == chan.dim:
            break
        out += i is None or not isinstance(i, int)
        dim_in += i is not None
    op.output(chan.moved_to(out + chan.dim - dim_in))


def permute(op: Op) -> None:
    """``permute``/``transpose``: the channels (or a fused projection's parts and heads) move to other dims."""
    chan, shape, stacked = op.channels(op.input), op.shape(), heads(op.walk).stacked.get(op.input)
    if (chan is None and stacked is None) or shape is None:
        return
    rank = len(shape)
    if op.node.target in ("transpose", torch.transpose) or op.node.op == "call_function" and len(op.node.args) == 3 \
            and all(isinstance(d, int) for d in op.node.args[1:3]):  # transpose(a, b), also aten.transpose.int
        order = list(range(rank))
        a, b = (d % rank for d in op.node.args[1:3])
        order[a], order[b] = b, a
    else:
        given = op.node.args[1:] if op.node.op == "call_method" else op.node.args[1]
        given = tuple(given[0]) if len(given) == 1 and isinstance(given[0], (list, tuple)) else tuple(given)
        order = [d % rank for d in given]
    if stacked is not None:
        set_stacked(op, stacked.permuted(order))
    else:
        op.output(chan.moved_to(order.index(chan.dim)))


def mean(op: Op) -> None:
    """A mean over dims other than the channels (global average pooling written as ``x.mean((2, 3))``)."""
    chan, src = op.channels(op.input), op.shape(op.input)
    if chan is None:
        return
    dims = op.node.args[1] if len(op.node.args) > 1 else op.node.kwargs.get("dim")
    keep = op.node.args[2] if len(op.node.args) > 2 else op.node.kwargs.get("keepdim", False)
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    dims = tuple(d % len(src) for d in dims)
    if not dims or chan.dim in dims:
        op.unknown("a mean over the channels")
        return
    op.output(chan.moved_to(chan.dim - (0 if keep else sum(d < chan.dim for d in dims))))


def reshape(op: Op) -> None:
    """A merge of the dims after the channel dim into it (a flatten): channel ``k`` becomes a run of features.

    A reshape of other dims only keeps the channels; the first view of a channel shuffle (see
    :func:`torchslim.structure.shuffle.shuffle`) gives its last reshape the shuffled channels; a split
    of the features into attention heads (``(B, T, H·D) → (B, T, H, D)``) opens a head space (see
    :mod:`~torchslim.structure.heads_layout`), and merging heads back is a flatten.
    """
    if op.node in op.walk.shuffled:
        op.output(op.walk.shuffled.pop(op.node))
        return
    chan, src, dst = op.channels(op.input), op.shape(op.input), op.shape()
    if chan is None:
        return
    if src == dst:
        op.output(chan)
        return
    if src is None or dst is None:
        op.unknown("a reshape of unknown shape")
        return
    d = chan.dim
    k = len(src) - len(dst)  # dims merged into the channel dim (a flatten, heads merged back, repeat_kv)
    if k > 0 and dst[:d] == src[:d] and dst[d + 1:] == src[d + k + 1:] and dst[d] == math.prod(src[d:d + k + 1]):
        why = merge_reason(op, d) if is_head(op.walk, chan) else None
        if why is not None:
            op.unknown(why)
        else:
            op.output(chan.widen(math.prod(src[d + 1:d + k + 1])))
        return
    if shuffle(op, chan, src, dst) or split_heads(op, chan, src, dst):
        return
    kept = _kept_channel_dim(src, dst, d)
    if kept is not None:  # only other dims change (ViT's (B, C, H, W) -> (B, C, H·W)): the channels stay
        op.output(chan.moved_to(kept))
        return
    op.unknown(f"a reshape from {list(src)} to {list(dst)}")


def _kept_channel_dim(src: tuple[int, ...], dst: tuple[int, ...], d: int) -> int | None:
    """The dim of ``dst`` that is ``src``'s dim ``d`` unchanged (as many entries before and after it), or None."""
    before = math.prod(src[:d])
    for e in range(len(dst)):
        if dst[e] == src[d] and math.prod(dst[:e]) == before and math.prod(dst[e + 1:]) == math.prod(src[d + 1:]):
            return e
    return None


_PAD_MODES = {"reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
              "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
              "circular": tuple(getattr(nn, f"CircularPad{d}d") for d in (1, 2, 3) if hasattr(nn, f"CircularPad{d}d"))}


def pad(op: Op) -> None:
    """``F.pad`` and the padding modules: channels pass where the pad leaves the channel dim alone.

    ``pad`` lists ``(before, after)`` pairs from the last dim backwards. Padding the channel dim
    adds entries the compact model would add again in its own place: those channels are pinned.
    A constant pad with a nonzero value maps a zero channel to a nonzero border.
    """
    chan, shape = op.channels(op.input), op.shape(op.input)
    if chan is None or shape is None:
        return
    pads, mode, value = _padding(op)
    if not isinstance(pads, (list, tuple)) or not all(isinstance(p, int) for p in pads) \
            or not isinstance(value, (int, float)):
        op.unknown(f"{op.describe()} with computed padding")
        return
    at = 2 * (len(shape) - 1 - chan.dim)  # the channel dim's (before, after) pair
    if any(pads[at:at + 2]):
        op.fix(chan, f"{op.describe()} pads the channel dim at {op.where()}")
        return
    op.output(chan, zero_preserving=mode != "constant" or value == 0)


def _padding(op: Op) -> tuple[Any, str, Any]:
    """``(pads, mode, value)`` of a pad call or module."""
    if op.module is not None:  # the padding modules store all pairs: (left, right, top, bottom, ...)
        mode = next((m for m, classes in _PAD_MODES.items() if isinstance(op.module, classes)), "constant")
        return op.module.padding, mode, getattr(op.module, "value", 0)
    args, kwargs = op.node.args, op.node.kwargs
    pads = args[1] if len(args) > 1 else kwargs.get("pad")
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value")
    return pads, mode, 0 if value is None else value


def _pixel_channels(op: Op) -> tuple[Channels, int] | None:
    """The input's channels and the factor ``r`` of a pixel (un)shuffle; None when it has no channels or
    they are not the dimension the op folds (then the op is handled as unknown)."""
    chan, r = op.channels(op.input), _factor(op)
    if chan is None:
        return None
    if r is None or chan.dim != len(op.shape(op.input)) - 3:
        op.unknown(f"{op.describe()} over a non-channel dimension" if r else None)
        return None
    return chan, r


def pixel_unshuffle(op: Op) -> None:
    """``pixel_unshuffle(x, r)``: input channel ``c`` becomes output channels ``c·r² + [0, r²)``."""
    if (found := _pixel_channels(op)) is None:
        return
    chan, r = found
    op.output(chan.widen(r * r))


def pixel_shuffle(op: Op) -> None:
    """``pixel_shuffle(x, r)``: output channel ``c`` is input channels ``c·r² + [0, r²)``, which go as one.

    A segment ``r²`` entries wide per member (after an unshuffle) narrows back; a whole space one
    entry per channel gets a new space of ``C/r²`` channels, united with it at the granularity of
    blocks of ``r²`` (as a grouped conv's groups), so a member is ``r²`` input channels and one output channel.
    """
    if (found := _pixel_channels(op)) is None:
        return
    chan, r = found
    r2, graph, segs = r * r, op.walk.graph, []
    for seg in chan.segs:
        if seg.offset % r2 == 0 and seg.width % r2 == 0 and seg.stride % r2 == 0:
            segs.append(Segment(seg.space, seg.lo, seg.hi, seg.width // r2, seg.offset // r2, seg.stride // r2))
        elif (seg.width, seg.stride, seg.lo) == (1, 1, 0) and seg.hi == graph.spaces[seg.space].size \
                and seg.hi % r2 == 0 and seg.offset % r2 == 0:
            sid = graph.new(seg.hi // r2)
            graph.union(seg.space, sid, groups=seg.hi // r2)
            segs.append(Segment(sid, 0, seg.hi // r2, 1, seg.offset // r2))
        else:
            op.unknown(f"{op.describe()} of channels not in blocks of {r2}")
            return
    op.output(Channels(chan.dim, tuple(segs)))


def _factor(op: Op) -> int | None:
    """The ``r`` of a pixel (un)shuffle call or module, or None where it is computed."""
    if op.module is not None:
        r = getattr(op.module, "upscale_factor", None) or getattr(op.module, "downscale_factor", None)
    else:
        r = op.node.args[1] if len(op.node.args) > 1 else next(iter(op.node.kwargs.values()), None)
    return r if isinstance(r, int) else None
