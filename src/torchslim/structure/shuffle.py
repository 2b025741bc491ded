"""A channel shuffle (ShuffleNet): view the channels as ``(a, b)``, swap the two, merge back."""

from __future__ import annotations

import torch
import torch.fx as fx

from torchslim.structure.capture import tensor_shape
from torchslim.structure.layout import Channels, Segment
from torchslim.structure.op import Op

RESHAPES = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}


def shuffle(op: Op, chan: Channels, src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    """Follow a channel shuffle that starts at ``op`` (a view), or return False where it does not apply.

    ShuffleNet's ``x.view(B, g, C // g, H, W).transpose(1, 2).contiguous().view(B, C, H, W)``
    (``a = g``) moves entry ``i·b + j`` to ``j·a + i``: each segment inside one group ``i`` becomes
    a segment ``a`` times as strided at offset ``j·a + i``. One of ``a``, ``b`` must be a constant
    in the code and the other computed, as the compact model reshapes fewer channels: with ``a``
    constant every group must keep the same ``j`` (with ``b`` constant, whole groups go), recorded
    as a tie that compaction satisfies. Only segments one entry wide are followed. The last reshape
    of the pattern gets the shuffled channels (``op.walk.shuffled``).
    """
    node, d = op.node, chan.dim
    if len(dst) != len(src) + 1 or dst[:d] != src[:d] or dst[d + 2:] != src[d + 1:]:
        return False
    a, b = dst[d], dst[d + 1]
    end = _pattern_end(node, d)
    fixed_a, fixed_b = _literal(node, d), _literal(node, d + 1)
    if end is None or tensor_shape(end) != src or _literal(end, d) or fixed_a == fixed_b:
        return False
    segs = []
    for seg in chan.segs:
        if seg.width != 1:
            return False
        first, last = seg.offset // b, (seg.end - 1) // b
        if first != last and seg.stride % b == 0:  # one entry j in each group: q = j·a + i with i stepping
            segs.append(Segment(seg.space, seg.lo, seg.hi, 1, (seg.offset % b) * a + first, seg.stride // b))
            continue
        if last - first > 64:
            return False  # would cut it into many pieces
        for i in range(first, last + 1):
            for piece in Channels(d, (seg,)).slice(i * b, (i + 1) * b).segs:
                segs.append(Segment(piece.space, piece.lo, piece.hi, 1, piece.offset * a + i, piece.stride * a))
    op.walk.graph.ties.append(("groups" if fixed_a else "blocks", chan, (a, b)))
    op.walk.shuffled[end] = Channels(d, tuple(segs))
    return True


def _pattern_end(view: fx.Node, d: int) -> fx.Node | None:
    """The reshape that merges dims ``d, d+1`` back after they were swapped, or None."""
    swap = _only_user(view)
    if swap is None or swap.op == "call_module" or not _swaps(swap, d, d + 1):
        return None
    end = _only_user(swap)
    while end is not None and end.op == "call_method" and end.target in ("contiguous", "clone"):
        end = _only_user(end)
    if end is None or end.op == "call_module" or end.target not in RESHAPES:
        return None
    return end


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _swaps(node: fx.Node, d: int, e: int) -> bool:
    """Whether ``node`` is a transpose/permute that swaps dims ``d`` and ``e`` and keeps the others."""
    shape = tensor_shape(node)
    if shape is None:
        return False
    rank = len(shape)
    if node.target in ("transpose", torch.transpose) and len(node.args) >= 3 \
            and all(isinstance(i, int) for i in node.args[1:3]):
        return {node.args[1] % rank, node.args[2] % rank} == {d, e}
    if node.target in ("permute", torch.permute):
        order = node.args[1:] if node.op == "call_method" else node.args[1:2]
        order = tuple(order[0]) if len(order) == 1 and isinstance(order[0], (list, tuple)) else tuple(order)
        want = list(range(rank))
        want[d], want[e] = e, d
        return all(isinstance(i, int) for i in order) and [i % rank for i in order] == want
    return False


def _literal(node: fx.Node, dim: int) -> bool:
    """Whether a view/reshape spells the size of ``dim`` as a constant (not -1): the compact model keeps it."""
    if node.target in ("view", "reshape"):
        shape = node.args[1:]
    elif node.target is torch.reshape:
        shape = node.args[1:2] or (node.kwargs.get("shape"),)
    else:
        return False  # flatten
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else tuple(shape)
    return dim < len(shape) and isinstance(shape[dim], int) and shape[dim] != -1
