"""Built-in rules for tensor operations: add, mul, cat, split/chunk, indexing, permute, mean, reshape, pad,
pixel (un)shuffle."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from torchslim.structure.capture import tensor_shapes
from torchslim.structure.layout import Channels, Segment, Stack
from torchslim.structure.op import Op
from torchslim.structure.shuffle import shuffle


def _name(op: Op) -> str:
    return getattr(op.node.target, "__name__", op.node.target)


def add(op: Op) -> None:
    """``a + b`` of same-shape tensors unites their channels (a residual trunk); ``x + scalar`` passes them."""
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
    if len(tensors) == 2 and all(c is not None for c in chans) and op.shape(tensors[0]) == op.shape(tensors[1]) \
            and chans[0].dim == chans[1].dim and any(_pinned(op, c) for c in chans):
        # channel k of the sum needs channel k of both: one operand keeps all its channels, so does the other
        op.fix(chans[0], f"added to pinned channels at {op.where()}")
        op.fix(chans[1], f"added to pinned channels at {op.where()}")
        op.output(chans[0])
        return
    op.unknown(f"{_name(op)} of these operands")


def _pinned(op: Op, chans: Channels) -> bool:
    """Whether every channel of ``chans`` is pinned (each space is united with a fixed one)."""
    graph = op.walk.graph
    fixed = {graph.find(i) for i, space in enumerate(graph.spaces) if space.fixed}
    return all(graph.find(seg.space) in fixed for seg in chans.segs)


def scale(op: Op) -> None:
    """``x * scalar`` keeps channels apart; ``x * gate`` with a per-channel gate unites them."""
    tensors = [a for a in op.node.args[:2] if isinstance(a, fx.Node) and op.shape(a) is not None]
    chans = [op.channels(t) for t in tensors]
    if len(tensors) == 1 and chans[0] is not None:
        op.output(chans[0])
        return
    if len(tensors) == 2 and all(c is not None for c in chans):
        (a, b), (sa, sb) = chans, (op.shape(t) for t in tensors)
        if len(sa) == len(sb) and a.dim == b.dim and sa[a.dim] == sb[b.dim] and op.unite(a, b):
            op.output(a)  # a zero channel of either factor is zero in the product
            return
    op.unknown(f"{_name(op)} of two tensors")


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
    else:
        op.unknown("cat of these operands")


def split(op: Op) -> None:
    """``split``/``chunk``/``tensor_split`` into pieces: each piece carries its range of the channels.

    The compact model runs the same call on fewer channels. ``chunk(n)`` computes its pieces' size
    from the channels it gets, so it records a tie (each piece keeps ``ceil(C'/n)``, see
    :mod:`torchslim.surgery.ties`). Split sizes are constants in the user's forward (``split(x, w)``,
    ``split(x, [a, b])``; res2net's ``torch.split(x, self.width, 1)``), so every piece must keep
    exactly its size: the split input's channels are pinned.
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
    elif op.node.target in (torch.chunk, "chunk") and len(shapes) == chunks:
        op.walk.graph.ties.append(("chunk", chan, sizes))  # the pieces' sizes must still come out right
    else:
        op.fix(chan, f"{_name(op)} into pieces of fixed sizes {list(sizes)} at {op.where()}: "
                     "the compact model cuts the same sizes")
    op.walk.pieces[op.node] = pieces


def getitem(op: Op) -> None:
    """``t[i]`` of a split or an RNN's outputs, ``h_n[layer]`` of an RNN state, ``x[..]`` keeping the channels."""
    x, index, walk = op.input, op.node.args[1], op.walk
    if x in walk.pieces:
        piece = walk.pieces[x][index] if isinstance(index, int) else None
        if isinstance(piece, Channels):
            op.output(piece)
        elif isinstance(piece, Stack):
            walk.stacks[op.node] = piece
        elif isinstance(piece, list):
            walk.pieces[op.node] = piece
        else:
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
    """``x[..]`` that keeps every channel: ints and slices on other dims (``out[:, -1]``)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i is None or i is Ellipsis or not isinstance(i, (int, slice)) for i in items) \
            or (len(items) > chan.dim and items[chan.dim] != slice(None)):
        op.unknown("indexing into the channels")
        return
    dropped = sum(isinstance(i, int) for i in items[:chan.dim])
    op.output(chan.moved_to(chan.dim - dropped))


def permute(op: Op) -> None:
    """``permute``/``transpose``: the channels move to another dimension."""
    chan, shape = op.channels(op.input), op.shape()
    if chan is None:
        return
    rank = len(shape)
    if op.node.target in ("permute", torch.permute):
        order = op.node.args[1:] if op.node.op == "call_method" else op.node.args[1]
        order = tuple(order[0]) if len(order) == 1 and isinstance(order[0], (list, tuple)) else tuple(order)
        new = [d % rank for d in order].index(chan.dim)
    else:  # transpose(a, b)
        a, b = (d % rank for d in op.node.args[1:3])
        new = {a: b, b: a}.get(chan.dim, chan.dim)
    op.output(chan.moved_to(new))


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
    """Flatten of the trailing dims from the channel dim on: channel ``k`` becomes a run of features.

    Also the first view of a channel shuffle (see :func:`torchslim.structure.shuffle.shuffle`), whose
    last reshape gets the shuffled channels.
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
    d = chan.dim
    if src is not None and dst is not None and len(dst) == d + 1 and dst[:d] == src[:d] \
            and dst[d] == math.prod(src[d:]):
        op.output(chan.widen(math.prod(src[d + 1:])))
        return
    if src is not None and dst is not None and shuffle(op, chan, src, dst):
        return
    op.unknown(f"a reshape from {list(src or ())} to {list(dst or ())}")


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
