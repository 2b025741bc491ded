"""Parameters as operands of tensor ops: a position embedding added to the channels (``x + self.pos_embed``),
a class token concatenated to the tokens (``cat([cls_token.expand(B, -1, -1), x], 1)``).

Such a parameter writes the channels it lines up with: its entries along the channel dim (aligned from
the right, as broadcasting aligns them) are ``"out"`` stripes of those channels, zero when a channel is
silent. One broadcast over the channels (size 1 there) adds the same value to every channel instead.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from torchslim.structure.layout import Channels
from torchslim.structure.op import Op

_PARAM_VIEWS = ("expand", "expand_as", "to", "type_as", "contiguous", "float", "half", "bfloat16")
_ATEN_PARAM_VIEWS = (*(getattr(torch.ops.aten, n).default for n in ("expand", "alias", "_to_copy", "clone", "detach")),
                     torch.ops.aten.slice.Tensor)  # the same views in a graph torch.export captured


def parameter_source(node: Any) -> fx.Node | None:
    """The ``get_attr`` node of the parameter ``node`` is, through views that keep its trailing dims in place
    (``cls_token.expand(B, -1, -1)``, ``pos_embed[:, :T]``, ``.to(x)``); None for a computed tensor."""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        viewed = (node.op == "call_method" and node.target in _PARAM_VIEWS) or node.target in _ATEN_PARAM_VIEWS
        sliced = node.op == "call_function" and node.target is operator.getitem and all(
            isinstance(i, slice) or i is Ellipsis for i in (node.args[1] if isinstance(node.args[1], tuple)
                                                             else (node.args[1],)))
        if not (viewed or sliced):
            return None
        node = node.args[0]
    return node if isinstance(node, fx.Node) else None


def parameter_dim(op: Op, out: Channels, operand: fx.Node) -> tuple[fx.Node, int | None] | None:
    """``(parameter, its dim)`` where ``operand`` is a parameter whose entries along that dim line up with the
    output's channels ``out`` (aligned from the right); ``(parameter, None)`` where it is broadcast over them
    (size 1); None where it is no parameter or its size there differs."""
    param = parameter_source(operand)
    p_shape, o_shape, shape = op.shape(param) if param is not None else None, op.shape(operand), op.shape()
    if p_shape is None or o_shape is None or shape is None:
        return None
    from_end = len(shape) - out.dim
    if from_end > len(o_shape) or o_shape[-from_end] == 1 or from_end > len(p_shape) or p_shape[-from_end] == 1:
        return param, None  # one value for every channel
    if p_shape[-from_end] != shape[out.dim] or o_shape[-from_end] != shape[out.dim]:
        return None
    return param, len(p_shape) - from_end
