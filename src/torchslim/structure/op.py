"""What an op rule sees and may say: one traced operation (:class:`Op`) and the rule protocol (:class:`OpRule`).

The tracer walks the torch.fx graph and asks one rule per operation what happens to the channels.
A rule reads the channel layout of the operation's inputs (:meth:`Op.channels`) and says what the
output carries (:meth:`Op.output`), which spaces must go together (:meth:`Op.unite`), which are pinned
(:meth:`Op.fix`, :meth:`Op.pin`), and which parameters produce or read channels (:meth:`Op.produce`,
:meth:`Op.consume`, :meth:`Op.attach`). :meth:`Op.unknown` is what happens to an operation no rule
covers. See ``docs/op_rules.md`` for a worked handler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

import torch
import torch.fx as fx
from torch import nn

from torchslim.errors import UnsupportedOperation
from torchslim.structure.capture import module_path, tensor_shape, tensor_shapes
from torchslim.structure.graph import _DependencyGraph
from torchslim.structure.groups import Stripe
from torchslim.structure.layout import Channels, Segment, Stack, all_channels


@dataclass
class Walk:
    """What the walk over one traced graph has learned so far (built-in rules read it through :class:`Op`)."""

    gm: fx.GraphModule
    graph: _DependencyGraph
    info: dict[fx.Node, Channels] = field(default_factory=dict)   # tensors that carry channels
    pieces: dict[fx.Node, list[Any]] = field(default_factory=dict)  # tuples (split, RNN): Channels, Stack, list, None
    stacks: dict[fx.Node, Stack] = field(default_factory=dict)      # RNN final states, read by indexing dim 0
    shuffled: dict[fx.Node, Channels] = field(default_factory=dict)  # last reshape of a channel shuffle -> channels
    pinned: dict[str, set[int]] = field(default_factory=dict)       # unknown op -> spaces it pinned

    def node_channels(self, n: Any) -> list[Channels]:
        """Every channel description ``n`` carries: as a tensor, a tuple's pieces or an RNN state."""
        return all_channels([self.info.get(n), self.pieces.get(n), self.stacks.get(n)])


class Op:
    """One traced operation, as a rule sees it.

    Attributes:
        node: the ``torch.fx.Node`` (``node.args``, ``node.kwargs``, ``node.target``, ``node.name``).
        module: the called module for a module call, else None.
        path: the attribute path of the module it sits in (its own for a module call; ``""``: the model).
    """

    __slots__ = ("has_rule", "module", "node", "path", "walk")

    def __init__(self, walk: Walk, node: fx.Node, module: nn.Module | None = None, has_rule: bool = True) -> None:
        self.walk, self.node, self.module = walk, node, module
        self.path = module_path(node)
        self.has_rule = has_rule  # False: no rule covers it, :meth:`unknown` is all the tracer can do

    # -- reading --------------------------------------------------------------------------------
    @property
    def input(self) -> Any:
        """The first argument (the tensor most operations act on), or None."""
        return self.node.args[0] if self.node.args else None

    @property
    def inputs(self) -> list[fx.Node]:
        """Every node among the arguments, in order."""
        found: list[fx.Node] = []
        fx.node.map_arg((self.node.args, self.node.kwargs), lambda n: found.append(n) or n)
        return found

    def channels(self, value: Any) -> Channels | None:
        """The channel layout ``value`` (an argument) carries, or None (a constant, a shape, the input's ids)."""
        return self.walk.info.get(value) if isinstance(value, fx.Node) else None

    def shape(self, value: Any = None) -> tuple[int, ...] | None:
        """The shape of the tensor ``value`` (an argument), or of the output when ``value`` is None."""
        return tensor_shape(self.node if value is None else value)

    def param(self, name: str) -> str:
        """The qualified name of the called module's parameter ``name`` (``"layer1.0.conv1.weight"``)."""
        return f"{self.path}.{name}" if self.path else name

    @property
    def strict(self) -> bool:
        return self.walk.graph.strict

    # -- saying ---------------------------------------------------------------------------------
    def output(self, chans: Channels | None, *, zero_preserving: bool = True) -> None:
        """The output carries ``chans`` (None: no channels); ``zero_preserving=False`` if it may map 0 to non-0."""
        if chans is None:
            return
        if tensor_shapes(self.node) is not None:  # several tensors out: only pieces can describe them
            self.unknown(f"{self.describe()} returning several tensors")
            return
        if not zero_preserving:
            for seg in chans.segs:
                self.walk.graph.spaces[seg.space].zero_preserving = False
        self.walk.info[self.node] = chans

    def unite(self, a: Channels, b: Channels) -> bool:
        """Channel ``k`` of ``a`` and channel ``k`` of ``b`` go together; False (nothing united) where layouts differ."""
        if a.dim != b.dim or len(a.segs) != len(b.segs):
            return False
        spaces = self.walk.graph.spaces
        pairs = list(zip(a.segs, b.segs))
        if any((p.width, p.offset, p.stride) != (q.width, q.offset, q.stride) or (p.lo, p.hi) != (0, spaces[p.space].size)
               or (q.lo, q.hi) != (0, spaces[q.space].size) or spaces[p.space].size != spaces[q.space].size
               for p, q in pairs):
            return False
        for p, q in pairs:
            self.walk.graph.union(p.space, q.space)
        return True

    def fix(self, chans: Channels | None, why: str) -> None:
        """Pin the spaces of ``chans``: none of their channels becomes a group (``why`` says so in reports)."""
        for seg in chans.segs if chans is not None else ():
            self.walk.graph.fix(seg.space, why)

    def pin(self, why: str, values: Iterable[Any] | None = None) -> None:
        """Pin every channel the arguments (or ``values``) carry, as tensors, tuples or RNN states."""
        for n in self.inputs if values is None else values:
            for chans in self.walk.node_channels(n):
                self.fix(chans, why)

    def produce(self, size: int, *, dim: int, params: Sequence[str | tuple[str, int]], kind: str = "channel",
                fixed: str | None = None) -> Channels:
        """Open a new space of ``size`` channels along ``dim`` of the output, written by ``params``.

        ``params``: qualified names whose rows along dim 0 (or ``(name, dim)``) are the channels
        (weight, bias); ``kind``: the group kind it gives, ``"channel"`` (convolutions) or ``"neuron"``.
        """
        sid = self.walk.graph.new(size, fixed=fixed)
        space = self.walk.graph.spaces[sid]
        space.stripes += [Stripe(*p) if isinstance(p, tuple) else Stripe(p, 0) for p in params]
        space.producers.append(self.path)
        space.producer_kind.add(kind)
        chans = Channels(dim, (Segment(sid, 0, size),))
        self.output(chans)
        return chans

    def consume(self, chans: Channels | None, param: str, dim: int, *, channel_dim: int | None = None) -> None:
        """``param``'s entries along ``dim`` read ``chans`` (a layer's input columns): "in" stripes.

        With ``channel_dim``, channels along any other dimension are pinned instead.
        """
        if chans is None:
            return
        if channel_dim is not None and chans.dim != channel_dim:
            self.fix(chans, f"'{param}' reads a dimension other than the channels")
            return
        self.attach(chans, param, dim, "in")

    def attach(self, chans: Channels, param: str, dim: int, role: str = "out", scale: int = 1) -> None:
        """``param``'s rows along ``dim`` line up with ``chans`` (``scale`` rows per entry) in ``role``.

        ``role``: ``"out"`` (they write the channel: BatchNorm's γ, β; a depthwise filter), ``"in"``
        (they read it) or ``"state"`` (cut with it, not regularized: running statistics).
        """
        for seg in chans.segs:
            self.walk.graph.spaces[seg.space].stripes.append(
                Stripe(param, dim, seg.width * scale, role=role, lo=seg.lo, hi=seg.hi, offset=seg.offset * scale,
                       stride=seg.stride * scale))

    def unknown(self, what: str | None = None) -> None:
        """An operation whose channels cannot be followed: pin its inputs' channels, or raise when strict.

        Nothing happens where no argument carries removable channels (the network input).
        """
        tracked = [n for n in self.inputs if self.walk.node_channels(n)]
        spaces = {seg.space for n in tracked for c in self.walk.node_channels(n) for seg in c.segs}
        if all(self.walk.graph.spaces[s].fixed for s in spaces):
            return  # channels that were never removable (the network input): nothing is lost
        what, where = what or self.describe(), self.where()
        if self.strict:
            raise UnsupportedOperation(
                f"cannot follow channels through {what} at {where}. {self._remedy()}, pass strict=False "
                "to keep its input channels, or kinds=('filter', 'in_channel', 'shape') for uncoupled "
                "per-layer groups."
            )
        self.walk.pinned.setdefault(f"{what} at {where}", set()).update(
            s for s in spaces if not self.walk.graph.spaces[s].fixed)
        self.pin(f"cannot follow channels through {what} at {where}", tracked)

    # -- naming ---------------------------------------------------------------------------------
    def describe(self) -> str:
        """The operation in words: the module's class, the function's or the method's name."""
        if self.module is not None:
            return type(self.module).__name__
        if isinstance(self.node.target, torch._ops.OpOverload):
            return str(self.node.target)  # "aten.roll.default"
        return getattr(self.node.target, "__name__", str(self.node.target))

    def target_hint(self) -> str:
        """How to name this op in ``register_op``: a class, a function or a method name."""
        target = self.node.target
        if self.module is not None:
            return type(self.module).__name__
        if isinstance(target, str):
            return repr(target)
        if isinstance(target, torch._ops.OpOverload):
            return f"torch.ops.{target}"  # torch.ops.aten.roll.default
        module = getattr(target, "__module__", None) or ""
        module = "operator" if module == "_operator" else module
        return f"{module}.{getattr(target, '__name__', target)}".lstrip(".")

    def _remedy(self) -> str:
        """What a user can do: teach the op, or (a case its rule cannot follow) the module around it."""
        hint = "'elementwise' | 'opaque' | a handler"
        if not self.has_rule:
            return f"Teach torchslim this op with torchslim.register_op({self.target_hint()}, {hint})"
        if self.module is not None or isinstance(self.node.target, torch._ops.OpOverload):  # export: no leaf modules
            return f"Its rule does not cover this case; torchslim.register_op({self.target_hint()}, a handler) replaces it"
        owner = self._owner()
        if owner is None:
            return "Its rule does not cover this case; wrap it in a module and teach torchslim that with register_op"
        return (f"Its rule does not cover this case; pass leaf_modules=({owner},) and teach torchslim the whole "
                f"module with torchslim.register_op({owner}, {hint})")

    def where(self) -> str:
        """Where the operation sits: its module's path and class (``"'add' in module 'layer1.0' (Bottleneck)"``)."""
        if self.module is not None:
            return f"module '{self.path}'"
        if not self.path:
            return f"'{self.node.name}' in the model's own forward"
        owner = self._owner()
        return f"'{self.node.name}' in module '{self.path}'" + (f" ({owner})" if owner else "")

    def _owner(self) -> str | None:
        """The class name of the module the operation sits in, from ``nn_module_stack``.

        fx records the class, torch.export its qualified name (``"transformers...LlamaMLP"``).
        """
        stack = self.node.meta.get("nn_module_stack")
        cls = next(reversed(stack.values()))[1] if stack else None
        return cls.rpartition(".")[2] if isinstance(cls, str) else getattr(cls, "__name__", None)


class OpRule(Protocol):
    """What the tracer asks of a rule: say what ``op`` does to the channels, through ``op``'s methods.

    A rule is any callable ``rule(op) -> None``. It reads ``op.node``, ``op.module`` and
    ``op.channels(arg)``/``op.shape(arg)``, then says what the output carries with ``op.output``,
    ``op.produce`` (a new space), ``op.unite``, ``op.fix``/``op.pin``, ``op.consume``/``op.attach``; or
    calls ``op.unknown()`` for a case it cannot follow. Saying nothing leaves the output without
    channels (any consumer then reads none), which is right only for ops whose output is not channels.
    """

    def __call__(self, op: Op) -> None: ...


@dataclass(frozen=True)
class Elementwise:
    """Output channel ``k`` depends only on input channel ``k`` (activations, dropout, pooling).

    ``zero_preserving``: the op maps 0 to 0 (ReLU yes, sigmoid no), so a channel whose producers are
    all zero stays zero behind it. ``channel_dim``: follow only channels along this dimension
    (pooling acts on the dims after 1); any other layout is :meth:`Op.unknown`.
    """

    zero_preserving: bool = True
    channel_dim: int | None = None

    def __call__(self, op: Op) -> None:
        chans = op.channels(op.input)
        if chans is not None and self.channel_dim is not None and chans.dim != self.channel_dim:
            op.unknown(f"{op.node.target} over a non-channel dimension")
            return
        op.output(chans, zero_preserving=self.zero_preserving)


@dataclass(frozen=True)
class Opaque:
    """An op whose channels are pinned: its inputs' channels stay whole and its output carries none."""

    def __call__(self, op: Op) -> None:
        op.pin(f"'{op.node.name}' is registered as opaque ({op.describe()})")
