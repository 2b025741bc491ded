"""Model → channel-dependency graph → groups.

We trace with ``torch.fx.symbolic_trace`` (module calls stay visible as ``call_module`` nodes named
like the model's attributes, which is what group names and compaction need) and propagate shapes
with the example inputs. Every tensor that carries channels is tagged with its *segments*: runs of
channels, each a range of a *space* (the channel dimension some Conv2d/Linear produced), laid out one
after another along the channel dimension. Operations that keep channels apart (activations, pooling,
BatchNorm, flatten, depthwise convolution, permutes) pass the segments on; ``cat`` joins them and
``split``/``chunk`` cut them; a residual addition or a per-channel product (squeeze-and-excitation)
unites the spaces of its operands, since channel ``k`` of both must go together; consumers (the next
Conv2d/Linear) record which of their input columns read each member. A channel shuffle interleaves
segments (each then has a stride), and records a tie that compaction must keep. A space that reaches the
network's output, comes from its input, or meets an operation we cannot follow is *fixed*: none of its
channels becomes a group.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from torchslim._inputs import Inputs, as_tuple
from torchslim.errors import ShapeMismatch, UnsupportedOperation
from torchslim.layers import is_rank_family
from torchslim.structure.groups import KINDS, SIDES, Family, Group, Stripe, side_families

log = logging.getLogger(__name__)

# Per-channel operations: output channel k depends only on input channel k.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Mish,
    nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
)
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
)
# torchvision's per-sample drop-path scales whole samples: channels stay apart (matched by name, so
# that tracing does not import torchvision)
_ELEMENTWISE_NAMES = {"StochasticDepth", "stochastic_depth"}
_NOT_ZERO_PRESERVING: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_ELEMENTWISE_FUNCTIONS: dict[Any, bool] = {  # target -> maps 0 to 0
    F.relu: True, torch.relu: True, F.relu6: True, F.leaky_relu: True, F.gelu: True, F.silu: True,
    F.hardswish: True, torch.tanh: True, F.dropout: True, F.elu: True,
    torch.sigmoid: False, F.sigmoid: False, F.hardsigmoid: False,
    "relu": True, "relu_": True, "tanh": True, "sigmoid": False, "contiguous": True, "clone": True,
}
_POOL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
}
_ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_", operator.sub, torch.sub, "sub"}
_RESHAPE_TARGETS = {torch.flatten, torch.reshape, "flatten", "view", "reshape"}
_MUL_TARGETS = {operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div"}
_CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}
_SPLIT_TARGETS = {torch.split, torch.chunk, torch.tensor_split, "split", "chunk"}
_PERMUTE_TARGETS = {torch.permute, "permute", torch.transpose, "transpose"}
_MEAN_TARGETS = {torch.mean, "mean"}


@dataclass(frozen=True)
class _Seg:
    """Members ``[lo, hi)`` of ``space``: member ``k`` is entries ``offset + (k - lo)·stride + [0, width)``.

    ``stride`` is ``width`` for members side by side; a channel shuffle interleaves segments, each
    member ``stride`` entries after the previous one.
    """

    space: int
    lo: int
    hi: int
    width: int = 1
    offset: int = 0
    stride: int = 0  # 0: width

    def __post_init__(self) -> None:
        if not self.stride:
            object.__setattr__(self, "stride", self.width)

    @property
    def end(self) -> int:
        """One past the segment's last entry."""
        return self.offset + (self.hi - self.lo - 1) * self.stride + self.width

    def moved(self, by: int) -> "_Seg":
        return dataclasses.replace(self, offset=self.offset + by)


@dataclass(frozen=True)
class _Chan:
    """How a tensor carries channels along ``dim``: its segments, by offset (they cover every entry)."""

    dim: int
    segs: tuple[_Seg, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "segs", tuple(sorted(self.segs, key=lambda g: g.offset)))

    def widen(self, factor: int) -> "_Chan":
        return _Chan(self.dim, tuple(_Seg(g.space, g.lo, g.hi, g.width * factor, g.offset * factor,
                                          g.stride * factor) for g in self.segs))

    def slice(self, start: int, stop: int) -> "_Chan | None":
        """Entries ``[start, stop)`` of the channel dimension, or None where a member would be split.

        A strided segment keeps the members that start inside (a contiguous range of them), so a
        chunk of a shuffled tensor holds a strided part of each shuffled segment.
        """
        segs = []
        for seg in self.segs:
            n = seg.hi - seg.lo
            first = min(n, max(0, -(-(start - seg.offset) // seg.stride)))  # members [first, last) start inside
            last = min(n, max(0, -(-(stop - seg.offset) // seg.stride)))
            if first > 0 and seg.offset + (first - 1) * seg.stride + seg.width > start:
                return None
            if last > 0 and seg.offset + (last - 1) * seg.stride + seg.width > stop:
                return None
            if first < last:
                segs.append(_Seg(seg.space, seg.lo + first, seg.lo + last, seg.width,
                                 seg.offset + first * seg.stride - start, seg.stride))
        return _Chan(self.dim, tuple(segs))


@dataclass
class _Space:
    size: int
    stripes: list[Stripe] = field(default_factory=list)
    producers: list[str] = field(default_factory=list)
    producer_kind: set[str] = field(default_factory=set)  # "conv" / "linear"
    fixed: str | None = None  # why its channels cannot be removed
    zero_preserving: bool = True
    rnn: str | None = None  # the nn.LSTM/GRU whose hidden units these are: all its layers keep one size


@dataclass(frozen=True)
class _Stack:
    """An RNN's final state ``(layers·directions, N, H)``: index ``i`` along dim 0 carries ``chans[i]``."""

    chans: tuple[_Chan, ...]


class _DependencyGraph:
    """Union-find over channel spaces, filled in by walking the traced graph."""

    def __init__(self, strict: bool) -> None:
        self.spaces: list[_Space] = []
        self.parent: list[int] = []
        self.count: list[int] = []  # per root: members M of the class; a space of size C has C/M per member
        self.strict = strict
        # ops whose compact form needs aligned channels: (kind, input channels, sizes); see torchslim.surgery.ties
        self.ties: list[tuple[str, _Chan, tuple[int, ...]]] = []

    def new(self, size: int, fixed: str | None = None) -> int:
        self.spaces.append(_Space(size, fixed=fixed))
        self.parent.append(len(self.parent))
        self.count.append(size)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, groups: int | None = None) -> int:
        """Unite the classes of ``a`` and ``b``; ``groups``: only whole blocks of ``C/groups`` go together."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        self.count[ra] = math.gcd(self.count[ra], self.count[rb], groups or 0)
        return ra

    def fix(self, i: int, why: str) -> None:
        s = self.spaces[i]
        if s.fixed is None:
            s.fixed = why

    def classes(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.spaces)):
            out.setdefault(self.find(i), []).append(i)
        return out


def _tensor_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _span(st: Stripe, size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` a stripe of a space of ``size`` members covers."""
    n = (size if st.hi is None else st.hi) - st.lo
    return st.offset, st.offset + (n - 1) * st.stride + st.width if n > 0 else st.offset


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _swaps(node: fx.Node, d: int, e: int) -> bool:
    """Whether ``node`` is a transpose/permute that swaps dims ``d`` and ``e`` and keeps the others."""
    shape = _tensor_shape(node)
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


def _interleaved(a: Stripe, size_a: int, b: Stripe, size_b: int) -> bool:
    """Whether two strided stripes whose spans overlap hold disjoint rows (two shuffled segments)."""
    if a.stride == a.width and b.stride == b.width:
        return False
    rows = [st.member_rows(torch.arange(st.lo, size if st.hi is None else st.hi))[0]
            for st, size in ((a, size_a), (b, size_b))]
    return not bool(torch.isin(rows[0], rows[1]).any())


def _all_chans(pieces: Any) -> list[_Chan]:
    """Every channel description inside nested pieces (lists, stacks, None)."""
    if pieces is None:
        return []
    if isinstance(pieces, _Chan):
        return [pieces]
    if isinstance(pieces, _Stack):
        return list(pieces.chans)
    return [c for p in pieces for c in _all_chans(p)]


def _tensor_shapes(node: fx.Node) -> list[tuple[int, ...]] | None:
    """The shapes of a node that returns a tuple of tensors (``split``), else None."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (list, tuple)) and meta and all(hasattr(m, "shape") for m in meta):
        return [tuple(m.shape) for m in meta]
    return None


class _Walker:
    """Walks a shape-propagated GraphModule and fills a :class:`_DependencyGraph`."""

    def __init__(self, gm: fx.GraphModule, strict: bool) -> None:
        self.gm = gm
        self.graph = _DependencyGraph(strict)
        self.info: dict[fx.Node, _Chan] = {}
        self.pieces: dict[fx.Node, list[Any]] = {}  # tuples (split, RNN): _Chan, _Stack, list or None each
        self.stacks: dict[fx.Node, _Stack] = {}     # RNN final states, read by indexing dim 0
        self.shuffled: dict[fx.Node, _Chan] = {}    # the last reshape of a channel shuffle -> its channels

    # -- helpers -----------------------------------------------------------------------------
    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
        return found

    def _fix_chan(self, chan: _Chan, why: str) -> None:
        for seg in chan.segs:
            self.graph.fix(seg.space, why)

    def _unknown(self, node: fx.Node, what: str) -> None:
        tracked = [n for n in self._inputs(node) if n in self.info or n in self.pieces or n in self.stacks]
        if not tracked:
            return
        where = f"'{node.name}'" + (f" (module '{node.target}')" if node.op == "call_module" else "")
        why = f"cannot follow channels through {what} at {where}"
        chans = [c for n in tracked for c in self._node_chans(n)]
        if all(self.graph.spaces[seg.space].fixed for c in chans for seg in c.segs):
            return  # channels that were never removable (the network input): nothing is lost
        if self.graph.strict:
            raise UnsupportedOperation(
                f"{why}. Its input channels stay unremovable; pass strict=False to skip them, "
                "or kinds=('filter', 'in_channel', 'shape') for uncoupled per-layer groups."
            )
        log.info("%s; its channels are kept", why)
        for n in tracked:
            self._fix_node(n, why)

    def _node_chans(self, n: fx.Node) -> list[_Chan]:
        """Every channel description ``n`` carries: as a tensor, a tuple's pieces or an RNN state."""
        return _all_chans([self.info.get(n), self.pieces.get(n), self.stacks.get(n)])

    def _fix_node(self, n: fx.Node, why: str) -> None:
        for chan in self._node_chans(n):
            self._fix_chan(chan, why)

    def _stripes(self, chan: _Chan, param: str, dim: int, role: str, scale: int = 1) -> None:
        """Add ``param``'s rows along ``dim`` that line up with ``chan`` (``scale`` rows per entry)."""
        for seg in chan.segs:
            self.graph.spaces[seg.space].stripes.append(
                Stripe(param, dim, seg.width * scale, role=role, lo=seg.lo, hi=seg.hi, offset=seg.offset * scale,
                       stride=seg.stride * scale))

    def _consume(self, x: fx.Node, param: str, dim: int, channel_dim: int) -> None:
        """Record that ``param``'s ``dim`` reads the channels of ``x`` (if ``x`` carries any)."""
        chan = self.info.get(x)
        if chan is None:
            return
        if chan.dim != channel_dim:
            self._fix_chan(chan, f"'{param}' reads a dimension other than the channels")
            return
        self._stripes(chan, param, dim, "in")

    def _produce(self, node: fx.Node, name: str, size: int, kind: str, has_bias: bool, dim: int) -> None:
        sid = self.graph.new(size)
        space = self.graph.spaces[sid]
        space.stripes.append(Stripe(f"{name}.weight", 0))
        if has_bias:
            space.stripes.append(Stripe(f"{name}.bias", 0))
        space.producers.append(name)
        space.producer_kind.add(kind)
        self.info[node] = _Chan(dim, (_Seg(sid, 0, size),))

    def _pass(self, node: fx.Node, src: Any, zero_preserving: bool = True, channel_dim: int | None = None) -> None:
        chan = self.info.get(src)
        if chan is None:
            return
        if channel_dim is not None and chan.dim != channel_dim:
            self._unknown(node, f"{node.target} over a non-channel dimension")
            return
        if not zero_preserving:
            for seg in chan.segs:
                self.graph.spaces[seg.space].zero_preserving = False
        self.info[node] = chan

    def _unite(self, a: _Chan, b: _Chan) -> bool:
        """Unite channel ``k`` of ``a`` with channel ``k`` of ``b``; False where the layouts differ."""
        if a.dim != b.dim or len(a.segs) != len(b.segs):
            return False
        size = lambda seg: self.graph.spaces[seg.space].size  # noqa: E731
        pairs = list(zip(a.segs, b.segs))
        if any((p.width, p.offset, p.stride) != (q.width, q.offset, q.stride) or (p.lo, p.hi) != (0, size(p))
               or (q.lo, q.hi) != (0, size(q)) or size(p) != size(q) for p, q in pairs):
            return False
        for p, q in pairs:
            self.graph.union(p.space, q.space)
        return True

    # -- node kinds --------------------------------------------------------------------------
    def run(self) -> _DependencyGraph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shape = _tensor_shape(node)
                if shape is not None and len(shape) >= 2:
                    sid = self.graph.new(shape[1], fixed=f"network input '{node.name}'")
                    self.info[node] = _Chan(1, (_Seg(sid, 0, shape[1]),))
            elif node.op == "call_module":
                self._module(node, self.gm.get_submodule(node.target))
            elif node.op in ("call_function", "call_method"):
                self._function(node)
            elif node.op == "output":
                for n in self._inputs(node):
                    self._fix_node(n, "network output")
        self._shared_tensors()
        return self.graph

    def _shared_tensors(self) -> None:
        """Tied weights (a decoder sharing the embedding's table): one tensor, one name, one family.

        Stripes are renamed to the tensor's first name; two classes whose stripes cover the same rows
        of one tensor are united when the rows line up member for member, and fixed otherwise.
        """
        first: dict[int, str] = {}
        canon = {}
        for name, t in [*self.gm.named_parameters(remove_duplicate=False),
                        *self.gm.named_buffers(remove_duplicate=False)]:
            canon[name] = first.setdefault(id(t), name)
        claims: dict[tuple[str, int], list[tuple[int, Stripe]]] = {}
        for sid, space in enumerate(self.graph.spaces):
            space.stripes = [dataclasses.replace(st, param=canon.get(st.param, st.param)) for st in space.stripes]
            for st in space.stripes:
                claims.setdefault((st.param, st.dim), []).append((sid, st))
        for (param, _), owners in claims.items():
            for i, (a, sa) in enumerate(owners):
                for b, sb in owners[i + 1:]:
                    (a0, a1), (b0, b1) = _span(sa, self.graph.spaces[a].size), _span(sb, self.graph.spaces[b].size)
                    if self.graph.find(a) == self.graph.find(b) or a1 <= b0 or b1 <= a0 \
                            or _interleaved(sa, self.graph.spaces[a].size, sb, self.graph.spaces[b].size):
                        continue
                    if (a0, a1, sa.width, sa.stride, sa.lo) == (b0, b1, sb.width, sb.stride, sb.lo) \
                            and self.graph.spaces[a].size == self.graph.spaces[b].size:
                        self.graph.union(a, b)
                    else:
                        why = f"'{param}' is shared by layers whose channels do not line up"
                        self.graph.fix(a, why)
                        self.graph.fix(b, why)

    def _module(self, node: fx.Node, mod: nn.Module) -> None:
        name = str(node.target)
        x = node.args[0] if node.args else None
        if isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros" and mod.groups == 1:
            self._consume(x, f"{name}.weight", 1, channel_dim=1)
            self._produce(node, name, mod.out_channels, "conv", mod.bias is not None, dim=1)
        elif isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros" and mod.groups == mod.in_channels:
            self._depthwise(node, name, mod, x)
        elif isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros":
            self._grouped(node, name, mod, x)
        elif isinstance(mod, (nn.LSTM, nn.GRU)):
            self._rnn(node, name, mod, x)
        elif isinstance(mod, nn.Embedding):  # token ids in, a new feature space out: column k of the table
            sid = self.graph.new(mod.embedding_dim)
            self.graph.spaces[sid].stripes.append(Stripe(f"{name}.weight", 1))
            self.graph.spaces[sid].producers.append(name)
            self.graph.spaces[sid].producer_kind.add("linear")
            self.info[node] = _Chan(len(_tensor_shape(node)) - 1, (_Seg(sid, 0, mod.embedding_dim),))
        elif isinstance(mod, nn.Linear):
            shape = _tensor_shape(x)
            last = len(shape) - 1 if shape else 1
            self._consume(x, f"{name}.weight", 1, channel_dim=last)
            self._produce(node, name, mod.out_features, "linear", mod.bias is not None, dim=last)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            self._batchnorm(node, name, mod, x)
        elif isinstance(mod, _ELEMENTWISE_MODULES) or type(mod).__name__ in _ELEMENTWISE_NAMES:
            self._pass(node, x, zero_preserving=not isinstance(mod, _NOT_ZERO_PRESERVING))
        elif isinstance(mod, _POOL_MODULES):
            self._pass(node, x, channel_dim=1)
        elif isinstance(mod, nn.Flatten):
            self._reshape(node, x)
        else:
            self._unknown(node, type(mod).__name__)

    def _depthwise(self, node: fx.Node, name: str, mod: nn.Conv2d, x: fx.Node) -> None:
        """A depthwise conv (``groups == in_channels``): output channels ``k·m … k·m + m - 1`` read input ``k``.

        Its filters and bias go with their input channel, and its output carries the input's channels,
        each ``m = out/in`` entries wide.
        """
        chan = self.info.get(x)
        if chan is None or chan.dim != 1:
            self._unknown(node, "a depthwise Conv2d over a non-channel dimension")
            return
        m = mod.out_channels // mod.in_channels
        self._stripes(chan, f"{name}.weight", 0, "out", scale=m)
        if mod.bias is not None:
            self._stripes(chan, f"{name}.bias", 0, "out", scale=m)
        self.info[node] = chan.widen(m)

    def _grouped(self, node: fx.Node, name: str, mod: nn.Conv2d, x: fx.Node) -> None:
        """A grouped conv: group ``i``'s input and output channels can only go together, as one member.

        The input's space and the conv's output space are united at the granularity of whole groups
        (``C_in/groups`` and ``C_out/groups`` channels per member); the per-group input width
        (``weight.shape[1]``) does not change, the number of groups does.
        """
        chan = self.info.get(x)
        if chan is None:
            return
        seg = chan.segs[0] if len(chan.segs) == 1 else None
        if chan.dim != 1 or seg is None or (seg.width, seg.stride, seg.offset) != (1, 1, 0) \
                or (seg.lo, seg.hi) != (0, self.graph.spaces[seg.space].size):
            self._unknown(node, "a grouped Conv2d over several channel segments")
            return
        self._produce(node, name, mod.out_channels, "conv", mod.bias is not None, dim=1)
        self.graph.union(seg.space, self.info[node].segs[0].space, groups=mod.groups)

    def _rnn(self, node: fx.Node, name: str, mod: nn.LSTM | nn.GRU, x: Any) -> None:
        """ISS (Wen et al., ICLR 2018): hidden unit ``k`` of a layer is one member.

        Its rows ``g·H + k`` of ``weight_ih``, ``weight_hh`` and both biases for every gate ``g``
        (PyTorch's order: i, f, g, o; GRU: r, z, n), column ``k`` of its own ``weight_hh`` and of the
        next layer's ``weight_ih`` (at the direction's offset), and whatever reads the output. With
        zero rows a unit's gates are constants and its state stays 0 from a zero start, so zero rows
        make it silent.

        An explicit initial state ``(h0, c0)``/``h0`` pins the hidden size: the compact layer would
        need a state cut to the same units, and wherever the state comes from (an input, a parameter,
        a computed tensor, a zero tensor whose width may be a literal in ``forward``) compaction does
        not cut it. Every layer of the module is fixed, and so are the channels the state carries.
        A state that is ``None`` in the traced run (``rnn(x, None)``, or a ``forward`` argument that
        defaults to ``None``) is PyTorch's zero start.
        """
        if getattr(mod, "proj_size", 0):
            why = f"'{name}' is an LSTM with proj_size > 0: its hidden units are not removable (no ISS groups)"
            if self.graph.strict:
                raise UnsupportedOperation(f"{why}; pass strict=False to skip it, or build it without proj_size")
            log.info(why)
            self._unknown(node, "an LSTM with proj_size > 0")
            return
        state = node.args[1] if len(node.args) > 1 else node.kwargs.get("hx")
        if isinstance(state, fx.Node) and state.meta.get("type") is type(None):
            state = None  # a None-defaulting forward argument, None in the traced run: a zero start
        pinned = None
        if state is not None:
            pinned = (f"'{name}' is called with an explicit initial state: it pins the hidden size, "
                      "since compaction does not cut the state")
            if self.graph.strict:
                raise UnsupportedOperation(
                    f"{pinned}. Start '{name}' from a zero state (call it without one, or with None) "
                    "to make its hidden units removable, or pass strict=False to keep them all")
            log.info("%s; its hidden units are kept", pinned)
            found: list[fx.Node] = []
            fx.node.map_arg(state, lambda n: found.append(n) or n)
            for n in found:  # the state's own channels (a Linear's neurons, another RNN's h_n) keep H too
                self._fix_node(n, pinned)
        gates, hidden = (4 if isinstance(mod, nn.LSTM) else 3), mod.hidden_size
        dirs = ["", "_reverse"] if mod.bidirectional else [""]
        chan = self.info.get(x)
        if chan is not None and chan.dim != len(_tensor_shape(x)) - 1:
            self._fix_chan(chan, f"'{name}' reads a dimension other than the features")
        elif chan is not None:
            for sfx in dirs:
                self._stripes(chan, f"{name}.weight_ih_l0{sfx}", 1, "in")
        spaces = []
        for layer in range(mod.num_layers):
            for sfx in dirs:
                sid = self.graph.new(hidden, fixed=pinned)
                space = self.graph.spaces[sid]
                space.producers.append(f"{name}.l{layer}{sfx}")
                space.producer_kind.add("rnn")
                space.rnn = name
                names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if mod.bias else [])
                space.stripes += [Stripe(f"{name}.{w}_l{layer}{sfx}", 0, offset=g * hidden)
                                  for w in names for g in range(gates)]
                space.stripes.append(Stripe(f"{name}.weight_hh_l{layer}{sfx}", 1, role="in"))
                if layer + 1 < mod.num_layers:
                    space.stripes += [Stripe(f"{name}.weight_ih_l{layer + 1}{s2}", 1, role="in",
                                             offset=dirs.index(sfx) * hidden) for s2 in dirs]
                spaces.append(sid)
        last = len(_tensor_shape(x) or (0, 0, 0)) - 1
        out = _Chan(last, tuple(_Seg(sid, 0, hidden, offset=i * hidden) for i, sid in enumerate(spaces[-len(dirs):])))
        h = _Stack(tuple(_Chan(1, (_Seg(sid, 0, hidden),)) for sid in spaces))  # h_n[i]: (N, H)
        self.pieces[node] = [out, [h, h] if isinstance(mod, nn.LSTM) else h]     # LSTM: (h_n, c_n)

    def _batchnorm(self, node: fx.Node, name: str, mod: nn.Module, x: fx.Node) -> None:
        chan = self.info.get(x)
        if chan is None:
            return
        if chan.dim != 1:
            self._unknown(node, f"{type(mod).__name__} over a non-channel dimension")
            return
        if mod.affine:
            self._stripes(chan, f"{name}.weight", 0, "out")
            self._stripes(chan, f"{name}.bias", 0, "out")
        else:
            for seg in chan.segs:
                self.graph.spaces[seg.space].zero_preserving = False  # (0 - mean) / std is not 0
        if mod.track_running_stats:
            self._stripes(chan, f"{name}.running_mean", 0, "state")
            self._stripes(chan, f"{name}.running_var", 0, "state")
        self.info[node] = chan

    def _function(self, node: fx.Node) -> None:
        target = node.target
        x = node.args[0] if node.args else None
        if target in _SPLIT_TARGETS and _tensor_shapes(node) is not None:
            self._split(node, x)
            return
        if target is operator.getitem and x in self.pieces:
            index = node.args[1]
            piece = self.pieces[x][index] if isinstance(index, int) else None
            if isinstance(piece, _Chan):
                self.info[node] = piece
            elif isinstance(piece, _Stack):
                self.stacks[node] = piece
            elif isinstance(piece, list):
                self.pieces[node] = piece
            else:
                self._unknown(node, "indexing a split")
            return
        if target is operator.getitem and x in self.stacks:
            index = node.args[1]
            if isinstance(index, int) and _tensor_shape(node) is not None and len(_tensor_shape(node)) == 2:
                self.info[node] = self.stacks[x].chans[index]
            else:
                self._unknown(node, "indexing an RNN state other than by layer")
            return
        if target is operator.getitem and x in self.info:
            self._index(node, x, node.args[1])
            return
        if _tensor_shape(node) is None:
            if _tensor_shapes(node) is not None:  # tensors out of an operation we do not know
                self._unknown(node, getattr(target, "__name__", str(target)))
            return  # x.size(), shapes, scalars: no channels flow through
        if target in _ELEMENTWISE_FUNCTIONS or getattr(target, "__name__", None) in _ELEMENTWISE_NAMES:
            self._pass(node, x, zero_preserving=_ELEMENTWISE_FUNCTIONS.get(target, True))
        elif target in _POOL_FUNCTIONS:
            self._pass(node, x, channel_dim=1)
        elif target in _RESHAPE_TARGETS:
            self._reshape(node, x)
        elif target in _ADD_TARGETS:
            self._add(node)
        elif target in _MUL_TARGETS:
            self._scale(node)
        elif target in _CAT_TARGETS:
            self._cat(node)
        elif target in _PERMUTE_TARGETS:
            self._permute(node, x)
        elif target in _MEAN_TARGETS:
            self._mean(node, x)
        else:
            self._unknown(node, getattr(target, "__name__", str(target)))

    def _reshape(self, node: fx.Node, x: fx.Node) -> None:
        """Flatten of the trailing dims from the channel dim on: channel k becomes a run of features.

        Also the first view of a channel shuffle (see :meth:`_shuffle`), whose last reshape gets the
        shuffled channels.
        """
        if node in self.shuffled:
            self.info[node] = self.shuffled.pop(node)
            return
        chan, src, dst = self.info.get(x), _tensor_shape(x), _tensor_shape(node)
        if chan is None:
            return
        if src == dst:
            self.info[node] = chan
            return
        d = chan.dim
        if src is not None and dst is not None and len(dst) == d + 1 and dst[:d] == src[:d] \
                and dst[d] == math.prod(src[d:]):
            self.info[node] = chan.widen(math.prod(src[d + 1:]))
            return
        if src is not None and dst is not None and self._shuffle(node, chan, src, dst):
            return
        self._unknown(node, f"a reshape from {list(src or ())} to {list(dst or ())}")

    def _shuffle(self, node: fx.Node, chan: _Chan, src: tuple[int, ...], dst: tuple[int, ...]) -> bool:
        """A channel shuffle: the channels viewed as ``(a, b)``, the two swapped, merged back.

        ShuffleNet's ``x.view(B, g, C // g, H, W).transpose(1, 2).contiguous().view(B, C, H, W)``
        (``a = g``) moves entry ``i·b + j`` to ``j·a + i``: each segment inside one group ``i`` becomes
        a segment ``a`` times as strided at offset ``j·a + i``. One of ``a``, ``b`` must be a constant
        in the code and the other computed, as the compact model reshapes fewer channels: with ``a``
        constant every group must keep the same ``j`` (with ``b`` constant, whole groups go), recorded
        as a tie that compaction satisfies. Only segments one entry wide are followed. Returns False
        where the pattern or the mapping does not apply.
        """
        d = chan.dim
        if len(dst) != len(src) + 1 or dst[:d] != src[:d] or dst[d + 2:] != src[d + 1:]:
            return False
        a, b = dst[d], dst[d + 1]
        swap = _only_user(node)
        if swap is None or swap.op == "call_module" or not _swaps(swap, d, d + 1):
            return False
        end = _only_user(swap)
        while end is not None and end.op == "call_method" and end.target in ("contiguous", "clone"):
            end = _only_user(end)
        if end is None or end.op == "call_module" or end.target not in _RESHAPE_TARGETS or _tensor_shape(end) != src or _literal(end, d):
            return False
        fixed_a, fixed_b = _literal(node, d), _literal(node, d + 1)
        if fixed_a == fixed_b:
            return False
        segs = []
        for seg in chan.segs:
            if seg.width != 1:
                return False
            first, last = seg.offset // b, (seg.end - 1) // b
            if first != last and seg.stride % b == 0:  # one entry j in each group: q = j·a + i with i stepping
                segs.append(_Seg(seg.space, seg.lo, seg.hi, 1, (seg.offset % b) * a + first, seg.stride // b))
                continue
            if last - first > 64:
                return False  # would cut it into many pieces
            for i in range(first, last + 1):
                for piece in _Chan(d, (seg,)).slice(i * b, (i + 1) * b).segs:
                    segs.append(_Seg(piece.space, piece.lo, piece.hi, 1, piece.offset * a + i, piece.stride * a))
        self.graph.ties.append(("groups" if fixed_a else "blocks", chan, (a, b)))
        self.shuffled[end] = _Chan(d, tuple(segs))
        return True

    def _add(self, node: fx.Node) -> None:
        operands = [a for a in node.args[:2]]
        chans = [self.info.get(a) for a in operands if isinstance(a, fx.Node)]
        tensors = [a for a in operands if isinstance(a, fx.Node) and _tensor_shape(a) is not None]
        if len(tensors) == 2 and all(c is not None for c in chans) \
                and _tensor_shape(tensors[0]) == _tensor_shape(tensors[1]) and self._unite(*chans):
            self.info[node] = chans[0]
            return
        if len(tensors) == 1 and chans and chans[0] is not None:  # x + scalar
            self._pass(node, tensors[0], zero_preserving=False)
            return
        self._unknown(node, f"{getattr(node.target, '__name__', node.target)} of these operands")

    def _scale(self, node: fx.Node) -> None:
        """``x * scalar`` keeps channels apart; ``x * gate`` with a per-channel gate unites them."""
        operands = node.args[:2]
        tensors = [a for a in operands if isinstance(a, fx.Node) and _tensor_shape(a) is not None]
        if len(tensors) == 1 and tensors[0] in self.info:
            self._pass(node, tensors[0])
            return
        if len(tensors) == 2 and all(t in self.info for t in tensors):
            a, b = (self.info[t] for t in tensors)
            sa, sb = (_tensor_shape(t) for t in tensors)
            if len(sa) == len(sb) and a.dim == b.dim and sa[a.dim] == sb[b.dim] and self._unite(a, b):
                self.info[node] = a  # a zero channel of either factor is zero in the product
                return
        self._unknown(node, f"{getattr(node.target, '__name__', node.target)} of two tensors")

    def _cat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _tensor_shape(node)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            self._unknown(node, "cat of these operands")
            return
        dim = dim % len(shape)
        chans = [self.info.get(t) for t in tensors]
        if all(c is not None and c.dim == dim for c in chans):
            starts = [0]
            for t in tensors[:-1]:
                starts.append(starts[-1] + _tensor_shape(t)[dim])
            self.info[node] = _Chan(dim, tuple(seg.moved(at) for c, at in zip(chans, starts) for seg in c.segs))
        elif all(c is not None and c == chans[0] for c in chans):
            self.info[node] = chans[0]  # along another dim (batch, space): the channels stay as they are
        else:
            self._unknown(node, "cat of these operands")

    def _split(self, node: fx.Node, x: Any) -> None:
        """``split``/``chunk`` into pieces: each piece carries its range of the channels."""
        chan, shapes = self.info.get(x), _tensor_shapes(node)
        if chan is None:
            return
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = dim % len(shapes[0])
        if dim != chan.dim:
            self.pieces[node] = [chan] * len(shapes)
            return
        pieces, at = [], 0
        for shape in shapes:
            pieces.append(chan.slice(at, at + shape[dim]))
            at += shape[dim]
        if any(p is None for p in pieces):
            self._unknown(node, "a split inside a channel's entries")
        elif node.target in (torch.chunk, "chunk") and len(shapes) == (node.args[1] if len(node.args) > 1
                                                                         else node.kwargs.get("chunks")):
            # the compact model chunks fewer channels: the pieces' sizes must still come out right
            self.graph.ties.append(("chunk", chan, tuple(shape[dim] for shape in shapes)))
        self.pieces[node] = pieces

    def _index(self, node: fx.Node, x: fx.Node, index: Any) -> None:
        """``x[..]`` that keeps every channel: ints and slices on other dims (``out[:, -1]``)."""
        chan = self.info[x]
        items = index if isinstance(index, tuple) else (index,)
        if any(i is None or i is Ellipsis or not isinstance(i, (int, slice)) for i in items) \
                or (len(items) > chan.dim and items[chan.dim] != slice(None)):
            self._unknown(node, "indexing into the channels")
            return
        dropped = sum(isinstance(i, int) for i in items[:chan.dim])
        self.info[node] = _Chan(chan.dim - dropped, chan.segs)

    def _permute(self, node: fx.Node, x: Any) -> None:
        chan, shape = self.info.get(x), _tensor_shape(node)
        if chan is None:
            return
        rank = len(shape)
        if node.target in ("permute", torch.permute):
            order = node.args[1:] if node.op == "call_method" else node.args[1]
            order = tuple(order[0]) if len(order) == 1 and isinstance(order[0], (list, tuple)) else tuple(order)
            new = [d % rank for d in order].index(chan.dim)
        else:  # transpose(a, b)
            a, b = (d % rank for d in node.args[1:3])
            new = {a: b, b: a}.get(chan.dim, chan.dim)
        self.info[node] = _Chan(new, chan.segs)

    def _mean(self, node: fx.Node, x: Any) -> None:
        """A mean over dims other than the channels (global average pooling written as ``x.mean((2, 3))``)."""
        chan, src = self.info.get(x), _tensor_shape(x)
        if chan is None:
            return
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        dims = tuple(d % len(src) for d in dims)
        if not dims or chan.dim in dims:
            self._unknown(node, "a mean over the channels")
            return
        self.info[node] = _Chan(chan.dim - (0 if keep else sum(d < chan.dim for d in dims)), chan.segs)


def _trace(model: nn.Module, example_inputs: tuple[Tensor, ...],
           leaf_modules: Sequence[type[nn.Module]]) -> fx.GraphModule:
    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, tuple(leaf_modules)) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types for untraceable Python
        raise UnsupportedOperation(
            f"torch.fx could not trace {type(model).__name__}: {e}. Make the forward traceable "
            "(no data-dependent Python control flow), or pass leaf_modules=(TheBlock,) for the "
            "submodule that is not."
        ) from e
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    gm.eval()  # shape propagation must not touch BatchNorm statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except RuntimeError as e:
        shapes = [tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__ for t in example_inputs]
        raise ShapeMismatch(
            f"{type(model).__name__} fails on example inputs of shape {shapes}: {e}. Pass a batch "
            "the model accepts, e.g. one from your data loader."
        ) from e
    finally:
        model.train(was_training)
    return gm


def channel_graph(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...], *, strict: bool = False,
                  leaf_modules: Sequence[type[nn.Module]] = ()) -> tuple[_DependencyGraph, fx.GraphModule]:
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    gm = _trace(model, inputs, leaf_modules)
    return _Walker(gm, strict).run(), gm


def _label(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"


def coupled_families(model: nn.Module, graph: _DependencyGraph, roots: list[int] | None = None) -> list[Family]:
    """One ``channel``/``neuron``/``hidden``/``rank`` family per removable class of united spaces.

    ``roots``, if given, receives each family's class (its union-find root), in the same order.
    """
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    families = []
    for root, members in graph.classes().items():
        spaces = [graph.spaces[i] for i in members]
        producers = [p for s in spaces for p in s.producers]
        if not producers or any(s.fixed for s in spaces):
            continue
        kinds = set().union(*(s.producer_kind for s in spaces))
        kind = "channel" if "conv" in kinds else "hidden" if "rnn" in kinds else "neuron"
        if is_rank_family(model, producers):  # the r channels between a LowRank's two layers
            kind = "rank"
        count = graph.count[root]
        stripes = list(dict.fromkeys(_coarse(st, s.size // count) for s in spaces for st in s.stripes))
        if any(st is None for st in stripes):
            continue  # a consumer reads part of a grouped conv's channel block
        families.append(Family(
            kind=kind,
            label=_label(producers),
            size=count,
            stripes=tuple(stripes),
            params=params,
            zero_preserving=all(s.zero_preserving for s in spaces),
            uniform=next((s.rnn for s in spaces if s.rnn), None),
        ))
        if roots is not None:
            roots.append(root)
    return families


def _coarse(st: Stripe, per: int) -> Stripe | None:
    """``st`` with ``per`` consecutive members as one (grouped convs); None where a range splits a block."""
    if per == 1:
        return st
    if st.lo % per or (st.hi is not None and st.hi % per) or st.stride != st.width:
        return None
    return dataclasses.replace(st, width=st.width * per, stride=st.width * per, lo=st.lo // per,
                               hi=None if st.hi is None else st.hi // per)


def layer_families(model: nn.Module, kinds: Sequence[str]) -> list[Family]:
    """SSL's uncoupled per-layer groups: ``filter`` rows, ``in_channel`` columns, ``shape`` fibers."""
    params = dict(model.named_parameters())
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            n, c, kh, kw = mod.weight.shape
        elif isinstance(mod, nn.Linear):
            (n, c), kh, kw = mod.weight.shape, 1, 1
        else:
            continue
        w = f"{name}.weight" if name else "weight"
        if "filter" in kinds:
            out.append(Family("filter", name, n, (Stripe(w, 0),), params))
        if "in_channel" in kinds:
            out.append(Family("in_channel", name, c, (Stripe(w, 1, role="in"),), params))
        if "shape" in kinds and isinstance(mod, nn.Conv2d) and kh * kw > 1:
            out.append(Family("shape", name, c * kh * kw, (Stripe(w, 1, flat=True, role="in"),), params))
    return out


def structures(
    model: nn.Module,
    example_inputs: Inputs,
    kinds: Sequence[str] = ("channel", "neuron"),
    *,
    strict: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
) -> list[Group]:
    """The groups of ``model`` that SSL regularizes and compaction removes.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace.
        example_inputs: a tensor or a sequence of tensors the model accepts, e.g. ``(B, 1, 28, 28)``.
        kinds: any of ``"channel"`` (a conv output channel coupled with its bias, BatchNorm entries
            and every consumer's input columns), ``"neuron"`` (the same for Linear outputs),
            ``"filter"`` (``W[n]``), ``"in_channel"`` (``W[:, c]``), ``"shape"`` (``W[:, c, i, j]``) and
            ``"depth"`` (all weights of a residual branch; see :mod:`torchslim.structure.depth`) and ``"hidden"``
            (an LSTM/GRU hidden unit across its gates and consumers: ISS, Wen et al., ICLR 2018),
            ``"hidden_row"``/``"hidden_col"`` (only the gate rows that produce the unit / only the
            columns that read it: the paper's row/column alternative; see
            :func:`torchslim.structure.groups.side_families`) and ``"rank"`` (a component of a
            :class:`torchslim.surgery.lowrank.LowRank` layer, ungrouped ones only).
        strict: raise :class:`UnsupportedOperation` for an operation whose channels cannot be
            followed, instead of leaving its channels out of the groups.
        leaf_modules: module types to treat as opaque (not traced into).

    Returns:
        Groups in model order; each knows its parameters, so ``g.norm()`` and ``g.zero_()`` work.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UnsupportedOperation(f"unknown group kind(s) {unknown}; choose from {list(KINDS)}")
    families: list[Family] = []
    if {"channel", "neuron", "depth", "hidden", "rank", *SIDES} & set(kinds) or strict:
        graph, gm = channel_graph(model, as_tuple(example_inputs), strict=strict, leaf_modules=leaf_modules)
        coupled = coupled_families(model, graph)
        families += [f for f in coupled if f.kind in kinds] + side_families(coupled, kinds)
        if "depth" in kinds:
            from torchslim.structure.depth import depth_families, residual_branches  # depth builds on this module

            families += depth_families(model, residual_branches(model, gm))
    families += layer_families(model, kinds)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    families.sort(key=lambda f: (order.get(f.label.split("+")[0], 0), KINDS.index(f.kind)))
    return [Group(f, k) for f in families for k in range(f.size)]
