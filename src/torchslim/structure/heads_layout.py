"""Attention heads in a tensor's channel layout: the split of a projection into heads, and the fold of a fused one.

A projection's output ``(B, T, H·D)`` viewed as ``(B, T, H, D)`` carries one *head* per entry of the ``H``
dim: a new space of ``H`` members (kind ``"head"``), united with the projection's space at the granularity
of blocks of ``D`` rows, as a grouped conv's groups are (``graph.union(a, b, groups=H)``): the class then
has ``H`` members and the projection's ``H·D`` rows are ``D`` per member. Merging back to ``(B, T, H·D)``
is a flatten (``tensor_rules.reshape``): each head widens to ``D`` features, the output projection's
columns.

A fused projection (``Linear(C, 3·H·D)``) split into its q, k, v parts (``reshape(B, T, 3, H, D)``, or
``split``/``chunk`` into thirds and then each part into heads) is first *folded*: its space becomes ``r``
spaces, one per part, with its stripes cut at the parts' boundaries (:func:`fold`). Nothing is united by
that: the compact model needs only parts of equal widths, a ``"split"`` tie (:mod:`torchslim.surgery.ties`),
and attention itself unites head ``h`` of q, k and v (:mod:`~torchslim.structure.attention_rules`).

The compact model runs the same ``view`` on fewer heads, so the split's head count must come out of the
narrower tensor (``-1``, or computed from it) or be an attribute :func:`torchslim.surgery.heads.sync_attention`
rewrites (``num_heads``, ``n_head``...), and the head width must stay a constant. Where fx shows otherwise
(nanoGPT's ``view(B, T, n_head, C // n_head)`` with ``C`` the block's input width), the heads are pinned.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from torchslim.structure.capture import tensor_shape
from torchslim.structure.graph import _DependencyGraph
from torchslim.structure.groups import Stripe
from torchslim.structure.layout import Channels, Segment, Stack
from torchslim.structure.op import Op, Walk

# attributes that hold a head count, a head width, or heads·width: what sync_attention rewrites or keeps
HEAD_COUNTS = ("num_heads", "n_head", "n_heads", "num_attention_heads", "nhead", "heads")
KV_HEAD_COUNTS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
HEAD_DIMS = ("head_dim", "attention_head_size", "head_size", "d_head", "dim_head")
INNER_WIDTHS = ("all_head_size", "attn_dim", "inner_dim", "split_size")
SPLIT_OWNERS = ("GPT2Attention",)  # classes whose split_size sync_attention rewrites (an export graph names them)


@dataclass(frozen=True)
class Stacked:
    """A fused projection after ``reshape(B, T, r, H, D)``: index ``i`` along ``dim`` carries ``parts[i]``.

    The parts' dims count the stack dim (``(B, T, 3, H, D)``: ``dim`` 2, heads at 3).
    """

    dim: int
    parts: tuple[Channels, ...]

    def permuted(self, order: list[int]) -> Stacked:
        """After ``permute(order)`` (each entry normalized): every dim moves to its place in ``order``."""
        return Stacked(order.index(self.dim), tuple(p.moved_to(order.index(p.dim)) for p in self.parts))

    def take(self, i: int) -> Channels:
        """Part ``i`` alone, the stack dim indexed away."""
        part = self.parts[i]
        return part.moved_to(part.dim - (part.dim > self.dim))


@dataclass
class Heads:
    """What the walk learned about heads, beside :class:`~torchslim.structure.op.Walk` (one per traced graph)."""

    order: dict[fx.Node, int]                                      # graph position: which users were walked
    sources: dict[int, int] = field(default_factory=dict)          # head space -> the space whose rows it splits
    stacked: dict[fx.Node, Stacked] = field(default_factory=dict)  # fused (…, r, H, D) tensors
    scores: dict[fx.Node, tuple[Channels, Channels]] = field(default_factory=dict)  # q·kᵀ -> (q heads, k heads)


_STATE: weakref.WeakKeyDictionary[_DependencyGraph, Heads] = weakref.WeakKeyDictionary()


def heads(walk: Walk) -> Heads:
    """The head state of ``walk`` (made on first use)."""
    state = _STATE.get(walk.graph)
    if state is None:
        state = _STATE[walk.graph] = Heads({n: i for i, n in enumerate(walk.gm.graph.nodes)})
    return state


def is_head(walk: Walk, chan: Channels) -> bool:
    """Whether any segment of ``chan`` is in a class that holds a head space."""
    graph = walk.graph
    roots = {graph.find(h) for h in heads(walk).sources}
    return any(graph.find(seg.space) in roots for seg in chan.segs)


# -- the split ---------------------------------------------------------------------------------------

def split_heads(op: Op, chan: Channels, src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
    """Follow ``view(…, H·D) → (…, H, D)`` or ``(…, r·H·D) → (…, r, H, D)`` at ``op``; False where it is not one.

    The features must be the last dim. The output carries a head space along the ``H`` dim; with ``r > 1``
    parts (a fused q, k, v projection) one per part, as a :class:`Stacked` that the fx permutes, ``unbind``
    and ``t[i]`` follow. Where other ops read it (an export graph's aten ``permute``/``select``), the parts
    are united member for member and share one head space: a plain layout every rule follows, but q's and
    k's rows then stay ``"out"`` (see :mod:`~torchslim.structure.attention_rules`).
    """
    d, k = chan.dim, len(dst) - len(src)
    if d != len(src) - 1 or k not in (1, 2) or dst[:d] != src[:d] or math.prod(dst[d:]) != src[d]:
        return False
    r, n_heads = (dst[d] if k == 2 else 1), dst[-2]
    sizes = _view_sizes(op.node)
    if n_heads == 1 and sizes is not None and sizes[-2:-1] == (1,) and sizes[-1:] != (-1,) \
            and 1 not in _attrs(op, HEAD_COUNTS + KV_HEAD_COUNTS):
        return False  # view(B, T, 1, C): a new dim of one, not heads (tensor_rules.reshape keeps the channels)
    why = _fixed_split(op, d, k)
    if why is not None:
        op.unknown(why)
        return True
    parts = _parts(op, chan, r)
    if parts is None:
        return False
    state, graph = heads(op.walk), op.walk.graph
    if k == 1:
        op.output(Channels(d, (Segment(_head_space(op, state, parts[0], n_heads), 0, n_heads),)))
        return True
    size = graph.spaces[parts[0]].size
    graph.ties.append(("split", Channels(d, tuple(Segment(p, 0, size, offset=i * size) for i, p in enumerate(parts))),
                      (size,) * r))
    if _stack_users_ok(op.node):
        set_stacked(op, Stacked(d, tuple(Channels(d + 1, (Segment(_head_space(op, state, p, n_heads), 0, n_heads),))
                                         for p in parts)))
        return True
    for p in parts[1:]:  # other users (an export graph's aten permute, select): one head space for all parts
        graph.union(parts[0], p)
    op.output(Channels(d + 1, (Segment(_head_space(op, state, parts[0], n_heads), 0, n_heads),)))
    return True


def set_stacked(op: Op, stacked: Stacked) -> None:
    """The output is ``stacked``; its parts are also the node's pieces, so an op that pins or an output sees them."""
    heads(op.walk).stacked[op.node] = stacked
    op.walk.pieces[op.node] = list(stacked.parts)


_STACK_VIEWS = {"permute", "transpose", torch.permute, torch.transpose}


def _stack_users_ok(node: fx.Node) -> bool:
    """Whether a fused ``(…, r, H, D)`` tensor reaches only permutes, then ``unbind`` or ``t[i]`` of its parts."""
    for user in node.users:
        if user.target in _STACK_VIEWS:
            if not _stack_users_ok(user):
                return False
        elif not (user.target in ("unbind", torch.unbind)
                  or (user.target is operator.getitem and isinstance(user.args[1], int))):
            return False
    return True


def _head_space(op: Op, state: Heads, source: int, n_heads: int) -> int:
    """A new space of ``n_heads`` heads, united with ``source`` in blocks of ``size / n_heads`` rows."""
    graph = op.walk.graph
    sid = graph.new(n_heads)
    graph.spaces[sid].producer_kind.add("head")
    graph.union(source, sid, groups=n_heads)
    state.sources[sid] = source
    return sid


def _parts(op: Op, chan: Channels, r: int) -> list[int] | None:
    """The ``r`` spaces laid end to end along ``chan``'s dim, each whole and one entry per channel; None otherwise.

    One whole space with ``r > 1`` is folded into ``r``; a piece of a space (a ``split``/``chunk`` part) folds
    the space at the piece's size.
    """
    graph, segs = op.walk.graph, chan.segs
    if any(seg.width != 1 or seg.stride != 1 for seg in segs):
        return None
    if len(segs) == r and all(seg.lo == 0 and seg.hi == graph.spaces[seg.space].size for seg in segs) \
            and len({seg.hi for seg in segs}) == 1:
        return [seg.space for seg in segs]
    if len(segs) != 1:
        return None
    seg = segs[0]
    size, n = graph.spaces[seg.space].size, seg.hi - seg.lo
    if r > 1 and n == size:
        return fold(op, seg.space, r)
    if r == 1 and size % n == 0 and seg.lo % n == 0:
        pieces = fold(op, seg.space, size // n)
        return None if pieces is None else [pieces[seg.lo // n]]
    return None


# -- the fold ----------------------------------------------------------------------------------------

def fold(op: Op, sid: int, r: int) -> list[int] | None:
    """Split space ``sid`` into ``r`` spaces of ``size / r`` channels: the same channels, renamed; None if it cannot.

    Member ``s·n + j`` becomes member ``j`` of part ``s``: every stripe is cut at the parts' boundaries and
    every layout the walk holds (tensors, split pieces, RNN stacks, shuffles, ties) is renamed, so the
    graph says exactly what it said. Only a space alone in its class, not coarsened, can be folded.
    """
    graph = op.walk.graph
    space = graph.spaces[sid]
    root = graph.find(sid)
    if space.size % r or space.rnn or graph.count[root] != space.size \
            or any(graph.find(i) == root for i in range(len(graph.spaces)) if i != sid):
        return None
    n = space.size // r
    parts = [graph.new(n, fixed=space.fixed) for _ in range(r)]
    for s, p in enumerate(parts):
        part = graph.spaces[p]
        part.zero_preserving, part.producer_kind = space.zero_preserving, set(space.producer_kind)
        part.producers = list(space.producers)
        part.stripes = [piece for st in space.stripes if (piece := _stripe_part(st, space.size, s, n)) is not None]
    space.stripes, space.producers = [], []
    graph.fix(sid, f"folded into {r} parts at {op.where()}")
    _rename(op.walk, lambda c: _channels_parts(c, sid, parts, n))
    return parts


def _stripe_part(st: Stripe, size: int, s: int, n: int) -> Stripe | None:
    """The members of stripe ``st`` (of a space of ``size``) in part ``s`` (members ``[s·n, (s+1)·n)``)."""
    hi = size if st.hi is None else st.hi
    a, b = max(st.lo, s * n), min(hi, (s + 1) * n)
    if a >= b:
        return None
    return dataclasses.replace(st, lo=a - s * n, hi=None if b - s * n == n else b - s * n,
                               offset=st.offset + (a - st.lo) * st.stride)


def _channels_parts(chan: Channels, sid: int, parts: list[int], n: int) -> Channels:
    """``chan`` with every segment of space ``sid`` cut into its parts' segments."""
    if all(seg.space != sid for seg in chan.segs):
        return chan
    segs = []
    for seg in chan.segs:
        if seg.space != sid:
            segs.append(seg)
            continue
        for s, p in enumerate(parts):
            a, b = max(seg.lo, s * n), min(seg.hi, (s + 1) * n)
            if a < b:
                segs.append(Segment(p, a - s * n, b - s * n, seg.width, seg.offset + (a - seg.lo) * seg.stride,
                                    seg.stride))
    return Channels(chan.dim, tuple(segs))


def _rename(walk: Walk, f: Callable[[Channels], Channels]) -> None:
    """Apply ``f`` to every channel layout the walk holds."""
    def nested(x: Any) -> Any:
        if isinstance(x, Channels):
            return f(x)
        if isinstance(x, Stack):
            return Stack(tuple(f(c) for c in x.chans))
        if isinstance(x, list):
            return [nested(p) for p in x]
        return x

    for table in (walk.info, walk.shuffled):
        for node, chan in table.items():
            table[node] = f(chan)
    for node, pieces in walk.pieces.items():
        walk.pieces[node] = nested(pieces)
    for node, stack in walk.stacks.items():
        walk.stacks[node] = nested(stack)
    walk.graph.ties[:] = [(kind, f(chan), sizes) for kind, chan, sizes in walk.graph.ties]
    state = heads(walk)
    for node, st in state.stacked.items():
        state.stacked[node] = Stacked(st.dim, tuple(f(p) for p in st.parts))
    for node, (q, k) in state.scores.items():
        state.scores[node] = (f(q), f(k))


# -- will the compact model's view come out right? ------------------------------------------------------

def _fixed_split(op: Op, d: int, k: int) -> str | None:
    """Why the compact model could not repeat this split on fewer heads, or None.

    The head count must be ``-1``, computed, or an attribute compaction rewrites; the head width a constant
    (fx), or ``-1`` or an attribute like ``head_dim`` (torch.export, which writes computed sizes as numbers).
    """
    sizes = _view_sizes(op.node)
    if sizes is None or len(sizes) != d + k + 1:
        return None  # sizes we cannot read: the check in compact() stands
    h, w = sizes[-2], sizes[-1]
    head_attr = isinstance(h, int) and h != -1 and h in _attrs(op, HEAD_COUNTS + KV_HEAD_COUNTS)
    if not (h == -1 or isinstance(h, fx.Node) or head_attr):
        return (f"a split into {h} heads written as a constant (the compact model would split its fewer heads into "
                f"{h} again; write -1, or keep the count in an attribute named like num_heads)")
    if _exported(op.node):  # torch.export writes a computed width as a number: it must be an attribute's
        if w == -1 or w in _attrs(op, HEAD_DIMS):
            return None
        return (f"a split into heads {w} wide, a width named by no attribute like head_dim (torch.export shows "
                f"sizes as numbers, so whether the compact model splits {w} wide again cannot be seen)")
    if isinstance(w, fx.Node) and not (head_attr and _size_sources(w) <= {op.input}):
        return ("a split into heads whose width is computed from another tensor (nanoGPT's C // n_head with C the "
                "block's width: the compact model's heads would be narrower; write the head width as a constant)")
    return None


def merge_reason(op: Op, d: int) -> str | None:
    """Why merging heads at dim ``d`` (into ``H·D``) would not adapt to fewer heads, or None.

    The merged size must be ``-1``, computed from a tensor carrying the heads (fx), or an attribute
    compaction rewrites (``attn_dim``, ``all_head_size``, ``num_heads·head_dim``); torch.export shows a
    computed size as a number, so there only a merge into the last dim is checked, against attributes.
    """
    sizes = _view_sizes(op.node)
    if sizes is None or len(sizes) != len(op.shape()) or (_exported(op.node) and d != len(sizes) - 1):
        return None  # torch.export writes computed sizes as numbers (repeat_kv's H_kv·g): trusted
    size = sizes[d]
    if size == -1:
        return None
    if isinstance(size, fx.Node):
        if all(n is op.input or (op.channels(n) is not None and is_head(op.walk, op.channels(n)))
               for n in _size_sources(size)):
            return None
        return ("a merge of heads to a width computed from another tensor (the block's width: the compact model "
                "has fewer heads; write -1)")
    widths = set(_attrs(op, INNER_WIDTHS))
    widths |= {h * w for h in _attrs(op, HEAD_COUNTS) for w in _attrs(op, HEAD_DIMS)}
    if size in widths:
        return None
    return (f"a merge of heads to the constant width {size} (write -1, or keep it in an attribute named like "
            "attn_dim or all_head_size)")


_ATEN_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default)


def _view_sizes(node: fx.Node) -> tuple[Any, ...] | None:
    """The sizes a ``view``/``reshape`` asks for, as written (ints, -1, fx nodes); None for other calls.

    torch.export keeps a ``-1`` but writes computed sizes as the numbers they were.
    """
    if node.op == "call_method" and node.target in ("view", "reshape"):
        sizes = node.args[1:]
    elif node.op == "call_function" and (node.target is torch.reshape or node.target in _ATEN_VIEWS):
        sizes = node.args[1:2] or (node.kwargs.get("shape"),)
    else:
        return None
    return tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else tuple(sizes)


def _exported(node: fx.Node) -> bool:
    """Whether ``node`` is an aten operation of a torch.export graph."""
    return isinstance(node.target, torch._ops.OpOverload)


def _attrs(op: Op, names: tuple[str, ...]) -> list[int]:
    """The int attributes named ``names`` of the user's module the op sits in (none where it cannot be read)."""
    model = op.walk.gm.meta.get("torchslim_model")
    try:
        owner = model.get_submodule(op.path)
    except AttributeError:
        return []
    return [v for name in names if isinstance(v := getattr(owner, name, None), int) and not isinstance(v, bool)]


_SIZE_MATH = {operator.getitem, operator.mul, operator.floordiv, operator.add, operator.sub, operator.truediv, int}


def _size_sources(arg: Any) -> set[fx.Node]:
    """The tensors whose sizes a size expression reads (``x.size(-1) // 4`` -> ``{x}``); other nodes as they are."""
    found: set[fx.Node] = set()
    todo = [arg]
    while todo:
        n = todo.pop()
        if not isinstance(n, fx.Node):
            continue
        if (n.op == "call_method" and n.target == "size") or (n.op == "call_function" and n.target is getattr):
            found.add(n.args[0])
        elif n.op == "call_function" and n.target in _SIZE_MATH and tensor_shape(n) is None:
            todo.extend(n.all_input_nodes)
        else:
            found.add(n)
    return found


def rewritten_split(op: Op, size: int) -> bool:
    """Whether compaction rewrites this split's constant size: GPT-2's ``split(self.split_size)`` (sync_attention)."""
    stack = op.node.meta.get("nn_module_stack")
    owner = next(reversed(stack.values()))[1] if stack else None
    name = getattr(owner, "__name__", str(owner).rsplit(".", 1)[-1])
    return size in _attrs(op, ("split_size",)) or name in SPLIT_OWNERS

