"""Walk a shape-propagated GraphModule node by node, asking each operation's rule, into a dependency graph."""

from __future__ import annotations

import operator
from typing import Callable

import torch.fx as fx
from torch import nn

from torchslim.structure.capture import tensor_shape, tensor_shapes
from torchslim.structure.graph import _DependencyGraph
from torchslim.structure.layout import Channels, Segment
from torchslim.structure.op import Op, OpRule, Walk

Lookup = Callable[[fx.Node, "nn.Module | None"], "OpRule | None"]


def walk(gm: fx.GraphModule, strict: bool, lookup: Lookup) -> _DependencyGraph:
    """The channel-dependency graph of ``gm``; ``lookup(node, module)`` gives each operation's rule.

    The network's inputs and outputs are fixed; an operation without a rule is :meth:`Op.unknown`.
    ``graph.pinned`` then counts, per unknown operation, the channels it pinned.
    """
    state = Walk(gm, _DependencyGraph(strict))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = tensor_shape(node)
            if shape is not None and len(shape) >= 2:
                sid = state.graph.new(shape[1], fixed=f"network input '{node.name}'")
                state.info[node] = Channels(1, (Segment(sid, 0, shape[1]),))
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            rule = lookup(node, module)
            _apply(Op(state, node, module, has_rule=rule is not None), rule)
        elif node.op in ("call_function", "call_method"):
            if tensor_shape(node) is None and tensor_shapes(node) is None and node.target is not operator.getitem:
                continue  # x.size(), shapes, scalars: no channels flow through
            rule = lookup(node, None)
            _apply(Op(state, node, has_rule=rule is not None), rule)
        elif node.op == "output":
            for n in Op(state, node).inputs:
                for seg in (seg for chans in state.node_channels(n) for seg in chans.segs):
                    state.graph.fix(seg.space, "network output")
    canon: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        canon[name] = first.setdefault(id(t), name)
    state.graph.share_tensors(canon)
    state.graph.pinned = _pinned_channels(state)
    return state.graph


def _apply(op: Op, rule: OpRule | None) -> None:
    if rule is None:
        op.unknown()
    else:
        rule(op)


def _pinned_channels(state: Walk) -> dict[str, int]:
    """Channels each unknown operation pinned: per class of united spaces it touched, its widest space."""
    graph, out = state.graph, {}
    for what, spaces in state.pinned.items():
        widest: dict[int, int] = {}
        for s in spaces:
            root = graph.find(s)
            widest[root] = max(widest.get(root, 0), graph.spaces[s].size)
        if widest:
            out[what] = sum(widest.values())
    return out
