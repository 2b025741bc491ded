"""Built-in rules for tensor operations: add, mul, cat, split/chunk, indexing, permute, mean, reshape."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from torchslim.structure.capture import tensor_shapes
from torchslim.structure.layout import Channels, Stack
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
    op.unknown(f"{_name(op)} of these operands")


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
    """``split``/``chunk`` into pieces: each piece carries its range of the channels."""
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
    if any(p is None for p in pieces):
        op.unknown("a split inside a channel's entries")
    elif op.node.target in (torch.chunk, "chunk") and len(shapes) == chunks:
        # the compact model chunks fewer channels: the pieces' sizes must still come out right
        op.walk.graph.ties.append(("chunk", chan, tuple(shape[dim] for shape in shapes)))
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
