"""Built-in rules for convolutions: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d`` and ``F.conv1d/2d/3d``.

A module call and a functional call on a module's parameters are the same op: both describe the
conv as a :class:`_Conv` (qualified parameter names, groups, widths) and :func:`_channels` says what
it does to the channels. A functional conv's weight may also be *standardized* on the fly
(timm's ``StdConv2d``/``ScaledStdConv2d``: ``ŵ[o] = g[o]·(w[o] − mean(w[o]))/std(w[o])``, each filter
over its own input fan): removing output channel ``o`` drops row ``o`` of ``w`` (and of ``g``) and
changes no other filter, but removing an input column changes every filter's mean and variance,
even a zero column. Where the module's whole forward is that conv (timm's ``StdConv2d``, ``ScaledStdConv2d``),
an input column goes only together with its silent channel: the column is attached as a writer (so a member
is removable only where the channel's producers *and* this column are zero) and compaction swaps the module
for a :class:`~torchslim.layers.PaddedStdConv`, which standardizes over the original fan-in, the cut zeros
counted: exact. Otherwise (a ``StdConv2dSame`` pads first, a conv inside a larger forward) its input channels
are pinned.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from torchslim.structure.capture import module_ops, module_path
from torchslim.structure.graph import StdConvSite
from torchslim.structure.op import Op

_RESHAPES = ("reshape", "reshape_as", "view", "view_as", "flatten")
_SCALINGS = (torch.mul, operator.mul, operator.truediv)  # by a constant: a gain stays per filter
_STANDARD = {cls.forward for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                                     nn.ConvTranspose3d)}


@dataclass(frozen=True)
class _Conv:
    """One convolution as the rules see it; names are qualified (``"stem.conv.weight"``)."""

    weight: str
    bias: str | None
    c_in: int
    c_out: int
    groups: int = 1
    transposed: bool = False      # weight (C_in, C_out/groups, k…): out channels along dim 1
    gains: tuple[str, ...] = ()   # per-filter parameters (C_out, …) that scale each output channel
    standardized: bool = False    # each filter normalized over its input fan in the forward
    site: StdConvSite | None = None  # standardized: how compaction keeps it exact when its inputs are cut


def conv(op: Op) -> None:
    """``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``: a new space of output channels."""
    mod = op.module
    if mod.padding_mode != "zeros" or type(mod).forward not in _STANDARD:
        op.unknown()  # other padding, or a subclass's own forward (a leaf StdConv2d): unknown maths
        return
    _channels(op, _Conv(op.param("weight"), op.param("bias") if mod.bias is not None else None, mod.in_channels,
                        mod.out_channels, mod.groups, mod.transposed))


def conv_fn(op: Op) -> None:
    """``F.conv1d/2d/3d`` on parameters (``get_attr`` nodes), plain or weight-standardized; else unknown."""
    weight, bias, groups = call_arg(op, 1, "weight"), call_arg(op, 2, "bias"), call_arg(op, 6, "groups", 1)
    source = _weight_source(op, weight)
    bias_name = param_name(bias) if bias is not None else None
    shape, w_shape = op.shape(op.input), op.shape(weight)
    if source is None or (bias is not None and bias_name is None) or not isinstance(groups, int) \
            or shape is None or w_shape is None:
        op.unknown(f"{op.describe()} on a weight that is not a parameter")
        return
    name, gains, standardized = source
    site = _std_site(op, weight, name, bias_name) if standardized and groups == 1 else None
    _channels(op, _Conv(name, bias_name, shape[1], w_shape[0], groups, gains=gains, standardized=standardized,
                        site=site))


def padded_std_conv_fn(op: Op) -> None:
    """A :class:`~torchslim.layers.PaddedStdConv` (a compacted standardized conv): it stays exact when more zero
    columns go, so it needs no site."""
    weight, bias, gain = (param_name(call_arg(op, i, k)) for i, k in ((1, "weight"), (2, "bias"), (3, "gain")))
    shape, w_shape = op.shape(op.input), op.shape(call_arg(op, 1, "weight"))
    if weight is None or shape is None or w_shape is None or (call_arg(op, 2, "bias") is not None and bias is None) \
            or (call_arg(op, 3, "gain") is not None and gain is None):
        op.unknown(f"{op.describe()} on a weight that is not a parameter")
        return
    c = _Conv(weight, bias, shape[1], w_shape[0], gains=(gain,) if gain else (), standardized=True,
              site=StdConvSite("", weight, bias, gain, 1.0, 0.0))
    _channels(op, c)


def _channels(op: Op, c: _Conv) -> None:
    """Dense, depthwise or grouped: what the conv ``c`` does to the channels of ``op.input``."""
    chan = op.channels(op.input)
    if c.groups == 1:
        if c.site is not None:
            _standardized_columns(op, chan, c)
        elif c.standardized:
            op.fix(chan, f"a weight-standardized conv at '{op.path}' reads every input column: removing one "
                         "changes each filter's standardization, and its module does more than this conv, so "
                         "compaction cannot swap it for a PaddedStdConv")
        else:
            op.consume(chan, c.weight, 0 if c.transposed else 1, channel_dim=1)
        op.produce(c.c_out, dim=1, params=_writers(c))
    elif c.transposed:
        op.unknown(f"a grouped {op.describe()}")
    elif c.groups == c.c_in:
        _depthwise(op, c)
    else:
        _grouped(op, c)


def _standardized_columns(op: Op, chan: Any, c: _Conv) -> None:
    """A standardized conv's input columns: writers of their channels (removable only together with them,
    both zero), read by its statistics; compaction swaps the module for a ``PaddedStdConv`` when they go."""
    if chan is None:
        return
    if chan.dim != 1:
        op.fix(chan, f"'{c.weight}' reads a dimension other than the channels")
        return
    op.attach(chan, c.weight, 1, "out")
    for seg in chan.segs:
        op.walk.graph.spaces[seg.space].read_by_norm = True
    if c.site.module:
        op.walk.graph.norms[c.site.module] = c.site


def _writers(c: _Conv) -> list[str | tuple[str, int]]:
    """The rows that write output channel ``o``: the filter, the bias, any gains."""
    return [(c.weight, 1 if c.transposed else 0)] + ([c.bias] if c.bias else []) + list(c.gains)


def _depthwise(op: Op, c: _Conv) -> None:
    """A depthwise conv (``groups == in_channels``): output channels ``k·m … k·m + m - 1`` read input ``k``.

    Its filters and bias go with their input channel, and its output carries the input's channels,
    each ``m = out/in`` entries wide.
    """
    chan = op.channels(op.input)
    if chan is None or chan.dim != 1:
        op.unknown(f"a depthwise {op.describe()} over a non-channel dimension")
        return
    m = c.c_out // c.c_in
    for param, _ in (p if isinstance(p, tuple) else (p, 0) for p in _writers(c)):
        op.attach(chan, param, 0, "out", scale=m)
    op.output(chan.widen(m))


def _grouped(op: Op, c: _Conv) -> None:
    """A grouped conv: group ``i``'s input and output channels can only go together, as one member.

    The input's space and the conv's output space are united at the granularity of whole groups
    (``C_in/groups`` and ``C_out/groups`` channels per member); the per-group input width
    (``weight.shape[1]``) does not change, the number of groups does.
    """
    chan = op.channels(op.input)
    if chan is None:
        return
    seg = chan.segs[0] if len(chan.segs) == 1 else None
    if chan.dim != 1 or seg is None or (seg.width, seg.stride, seg.offset) != (1, 1, 0) \
            or (seg.lo, seg.hi) != (0, op.walk.graph.spaces[seg.space].size):
        op.unknown(f"a grouped {op.describe()} over several channel segments")
        return
    out = op.produce(c.c_out, dim=1, params=_writers(c))
    op.walk.graph.union(seg.space, out.segs[0].space, groups=c.groups)


# -- functional convs: where the weight comes from ------------------------------------------------

def call_arg(op: Op, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of the call, or its keyword ``name``."""
    args = op.node.args
    return args[i] if len(args) > i else op.node.kwargs.get(name, default)


def param_name(node: Any) -> str | None:
    """The qualified name of the parameter a ``get_attr`` node reads, else None."""
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _weight_source(op: Op, weight: Any) -> tuple[str, tuple[str, ...], bool] | None:
    """``(weight name, gains, standardized)`` for a parameter or a standardized parameter, else None.

    Standardized: ``batch_norm(W.reshape(1, C_out, -1), None, None, weight=g, bias=None,
    training=True).reshape_as(W)`` with ``g`` per filter (a parameter times constants, viewed flat).
    """
    name = param_name(weight)
    if name is not None:
        return name, (), False
    if not (isinstance(weight, fx.Node) and weight.op == "call_method" and weight.target in _RESHAPES):
        return None
    bn = weight.args[0]
    if not (isinstance(bn, fx.Node) and bn.op == "call_function" and bn.target is F.batch_norm):
        return None
    flat, stats = bn.args[0], [_kw(bn, i, k) for i, k in ((1, "running_mean"), (2, "running_var"))]
    w_shape = op.shape(weight)
    if any(s is not None for s in stats) or _kw(bn, 5, "training") is not True or w_shape is None \
            or not (isinstance(flat, fx.Node) and flat.op == "call_method" and flat.target in _RESHAPES) \
            or op.shape(flat) != (1, w_shape[0], _numel(w_shape) // w_shape[0]):
        return None
    name = param_name(flat.args[0])
    gains = [_gain(op, _kw(bn, i, k), w_shape[0]) for i, k in ((3, "weight"), (4, "bias"))]
    if name is None or op.shape(flat.args[0]) != w_shape or any(g == "" for g in gains):
        return None
    return name, tuple(g for g in gains if g), True


def _std_site(op: Op, weight: fx.Node, name: str, bias: str | None) -> StdConvSite | None:
    """Where the standardized conv ``op`` is its module's whole forward (``F.batch_norm`` over ``weight``'s filters,
    γ a parameter times constants, no β): what compaction needs to swap it for a ``PaddedStdConv``; else None."""
    path = op.path
    bn = weight.args[0]
    gain, scale = _kw(bn, 3, "weight"), 1.0
    chain = {op.node, weight, bn, bn.args[0]}
    while isinstance(gain, fx.Node) and gain.op != "get_attr":
        chain.add(gain)
        if gain.op == "call_function" and gain.target in _SCALINGS:
            scale = scale / gain.args[1] if gain.target is operator.truediv else scale * gain.args[1]
        gain = gain.args[0]
    eps = _kw(bn, 7, "eps")
    mine = module_ops(op.walk.gm.graph, path)
    args = [call_arg(op, i, k, d) for i, k, d in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1))]
    if not path or name != f"{path}.weight" or _kw(bn, 4, "bias") is not None or mine != chain \
            or module_path(op.input) == path or not isinstance(scale, (int, float)):
        return None
    return StdConvSite(path, name, bias, param_name(gain), float(scale), 1e-5 if eps is None else float(eps), *args)


def _kw(node: fx.Node, i: int, name: str) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _numel(shape: tuple[int, ...]) -> int:
    return int(torch.Size(shape).numel())


def _gain(op: Op, node: Any, rows: int) -> str | None:
    """The per-filter parameter behind ``node`` (views of it times constants); None if absent, "" if not one."""
    while isinstance(node, fx.Node) and node.op != "get_attr":
        reshaped = node.op == "call_method" and node.target in _RESHAPES
        scaled = node.op == "call_function" and node.target in _SCALINGS and len(node.args) == 2 \
            and not isinstance(node.args[1], fx.Node)
        if not (reshaped or scaled):
            return ""
        node = node.args[0]
    if node is None:
        return None
    shape = op.shape(node)
    return str(node.target) if shape and shape[0] == rows and _numel(shape) == rows else ""
