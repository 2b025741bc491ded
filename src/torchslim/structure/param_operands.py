"""Parameters as operands of tensor ops: a position embedding added to the channels (``x + self.pos_embed``),
a class token concatenated to the tokens (``cat([cls_token.expand(B, -1, -1), x], 1)``), a layer scale
multiplying them (``x * self.gamma``, ``x.mul_(gamma.view(1, -1, 1, 1))``).

Such a parameter writes the channels it lines up with: its entries along the channel dim (aligned from
the right, as broadcasting aligns them, or moved by a reshape that only adds or drops dims of size 1) are
``"out"`` stripes of those channels, zero when a channel is silent. One broadcast over the channels
(size 1 there) applies the same value to every channel instead.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from torchslim.structure.capture import tensor_shape
from torchslim.structure.layout import Channels
from torchslim.structure.op import Op

_aten = torch.ops.aten
_PARAM_VIEWS = ("expand", "expand_as", "to", "type_as", "contiguous", "float", "half", "bfloat16")
_ATEN_PARAM_VIEWS = (*(getattr(_aten, n).default for n in ("expand", "alias", "_to_copy", "clone", "detach")),
                     _aten.slice.Tensor)  # the same views in a graph torch.export captured
# reshapes that may only add or drop dims of size 1 on a parameter (``gamma.view(1, -1, 1, 1)``): checked on shapes
_UNIT_RESHAPES = ("view", "reshape", "unsqueeze", "squeeze")
_UNIT_RESHAPE_FNS = (torch.reshape, torch.unsqueeze, torch.squeeze)
_ATEN_UNIT_RESHAPES = (_aten.view, _aten.reshape, _aten._unsafe_view, _aten.unsqueeze, _aten.squeeze)


def _kept_right(node: fx.Node) -> bool:
    """A view that keeps the trailing dims in place (``expand``, ``.to(x)``, ``pos_embed[:, :T]``)."""
    if (node.op == "call_method" and node.target in _PARAM_VIEWS) or node.target in _ATEN_PARAM_VIEWS:
        return True
    index = node.args[1] if node.target is operator.getitem and len(node.args) > 1 else None
    return node.op == "call_function" and node.target is operator.getitem and all(
        isinstance(i, slice) or i is Ellipsis for i in (index if isinstance(index, tuple) else (index,)))


def _unit_reshape(node: fx.Node) -> bool:
    """A reshape call; :func:`_input_dim` checks that it only adds or drops dims of size 1."""
    return (node.op == "call_method" and node.target in _UNIT_RESHAPES) or node.target in _UNIT_RESHAPE_FNS \
        or getattr(node.target, "overloadpacket", None) in _ATEN_UNIT_RESHAPES


def _input_dim(node: fx.Node, dim: int | None) -> tuple[bool, int | None]:
    """``(followed, d)``: ``node``'s dim ``dim`` is dim ``d`` of its first argument (None: broadcast from size 1).

    ``followed`` is False where ``node`` is no view this module follows.
    """
    src, out = tensor_shape(node.args[0]), tensor_shape(node)
    if src is None or out is None:
        return False, None
    if _kept_right(node):
        at = None if dim is None else dim - (len(out) - len(src))
        return True, None if at is None or at < 0 or src[at] == 1 else at  # a sliced dim: parameter_dim checks
    if not _unit_reshape(node) or [s for s in src if s != 1] != [s for s in out if s != 1]:
        return False, None
    if dim is None or out[dim] == 1:
        return True, None
    nth = sum(s != 1 for s in out[:dim])  # the dim is the nth of size > 1, in both shapes
    return True, [i for i, s in enumerate(src) if s != 1][nth]


def _trace_back(node: Any, dim: int | None) -> tuple[fx.Node, int | None] | None:
    """The ``get_attr`` node of the parameter ``node`` views, and which of its dims is ``node``'s ``dim``."""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        if node.op not in ("call_method", "call_function") or not node.args:
            return None
        followed, dim = _input_dim(node, dim)
        if not followed:
            return None
        node = node.args[0]
    return (node, dim) if isinstance(node, fx.Node) else None


def parameter_source(node: Any) -> fx.Node | None:
    """The ``get_attr`` node of the parameter ``node`` is, through views that keep its trailing dims in place
    (``cls_token.expand(B, -1, -1)``, ``pos_embed[:, :T]``, ``.to(x)``) or only add or drop dims of size 1
    (``gamma.view(1, -1, 1, 1)``); None for a computed tensor."""
    found = _trace_back(node, None)
    return found[0] if found is not None else None


def parameter_dim(op: Op, out: Channels, operand: fx.Node) -> tuple[fx.Node, int | None] | None:
    """``(parameter, its dim)`` where ``operand`` is a parameter whose entries along that dim line up with the
    output's channels ``out`` (aligned from the right); ``(parameter, None)`` where it is broadcast over them
    (size 1); None where it is no parameter or its size there differs."""
    o_shape, shape = op.shape(operand), op.shape()
    if o_shape is None or shape is None:
        return None
    from_end = len(shape) - out.dim
    broadcast = from_end > len(o_shape) or o_shape[-from_end] == 1
    if not broadcast and o_shape[-from_end] != shape[out.dim]:
        return None
    found = _trace_back(operand, None if broadcast else len(o_shape) - from_end)
    if found is None or op.shape(found[0]) is None:
        return None
    param, dim = found
    if dim is not None and op.shape(param)[dim] != shape[out.dim]:
        return None  # a part of the parameter's entries: the compact model would slice the same sizes
    return param, dim
