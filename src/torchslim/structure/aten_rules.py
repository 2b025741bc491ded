"""Rules for aten operations, as ``torch.export`` captures them.

An aten op takes the rule of its functional or method equivalent (``aten.linear`` → ``F.linear``,
``aten.add.Tensor`` → ``operator.add``, ``aten.view`` → ``"view"``), so the built-in rules, and a user's
``register_op`` on ``F.linear`` or ``torch.cat``, apply to the aten op too. Where no rule reads the aten
arguments (``permute``'s list of dims, views that merge the batch dims, GPT-2's ``addmm``), a rule here does,
unless the user registered the equivalent (same arguments: ``torch.permute``). ``embedding(weight, indices)`` and ``batch_norm(x, weight, bias, mean, var, …)`` take their
arguments in another order than ``F.embedding``/``F.batch_norm``: they are taught by registering the aten
overload. A registration on the overload (``torch.ops.aten.roll.default``) or its packet
(``torch.ops.aten.roll``) wins over all of these. An op with no entry is unknown (pinned, warned).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from torchslim.structure import tensor_rules as T
from torchslim.structure.capture import tensor_shapes
from torchslim.structure.conv_rules import _channels, _Conv, call_arg, param_name
from torchslim.structure.layout import Channels
from torchslim.structure.op import Elementwise, Op, OpRule

_aten = torch.ops.aten


@dataclass(frozen=True)
class _Via:
    """How an aten op is followed: ``key``'s rule, else ``own``; ``first`` handles some cases before either."""

    key: Any = None                             # the functional or method equivalent (same arguments)
    own: OpRule | None = None                   # an aten-level rule, where ``key`` has none (or ``native``)
    first: Callable[[Op], bool] | None = None   # True: done; False: the case goes to ``key``'s rule
    native: OpRule | None = None                # ``key``'s built-in rule, which cannot read the aten arguments


@dataclass(frozen=True)
class _First:
    """``first(op)``, and ``rest`` (or the standard unknown case) where it declines."""

    first: Callable[[Op], bool]
    rest: OpRule | None

    def __call__(self, op: Op) -> None:
        if not self.first(op):
            (self.rest or Op.unknown)(op)


def aten_rule(target: Any, get: Callable[[Any], OpRule | None]) -> OpRule | None:
    """The rule for an aten overload ``target``; ``get(key)`` reads the table (user registrations first)."""
    packet = getattr(target, "overloadpacket", None)
    rule = get(target) or (get(packet) if packet is not None else None)
    if rule is not None:
        return rule
    via = _TABLE.get(target) or _TABLE.get(packet)
    if via is None:
        return None
    rule = get(via.key) if via.key is not None else None
    if rule is not None and rule is via.native:
        rule = None  # it reads the functional form's arguments (e.g. permute's dims one by one)
    if via.first is not None:
        return _First(via.first, rule or via.own)
    return rule or via.own


# -- adapters: aten arguments where they differ from the functional form ---------------------------

def _embedding(op: Op) -> None:
    """``embedding(weight, indices)``: a new space, column ``k`` of the table (as an ``nn.Embedding``)."""
    name, shape = param_name(op.input), op.shape(op.input)
    if name is None or shape is None or len(shape) != 2:
        op.unknown("an embedding of a computed table")
        return
    op.produce(shape[1], dim=len(op.shape()) - 1, params=[(name, 1)], kind="neuron")


def _batch_norm(op: Op) -> None:
    """``batch_norm(x, weight, bias, running_mean, running_var, …)`` and its ``native`` forms (a tuple, item 0).

    As ``F.batch_norm`` on a module's parameters: each given tensor goes with its channel.
    """
    chan = op.channels(op.input)
    if chan is None:
        return
    args = {k: call_arg(op, i, k) for i, k in enumerate(("weight", "bias", "running_mean", "running_var"), 1)}
    names = {k: param_name(a) for k, a in args.items()}
    if chan.dim != 1 or any(a is not None and names[k] is None for k, a in args.items()):
        op.unknown("batch_norm over a non-channel dimension" if chan.dim != 1 else
                   "batch_norm with computed statistics or affine terms")
        return
    for key, role in (("weight", "out"), ("bias", "out"), ("running_mean", "state"), ("running_var", "state")):
        if names[key] is not None:
            op.attach(chan, names[key], 0, role)
    shapes = tensor_shapes(op.node)
    if shapes is None:
        op.output(chan, zero_preserving=names["weight"] is not None)
        return
    if names["weight"] is None:  # (0 − mean)/std is not 0
        for seg in chan.segs:
            op.walk.graph.spaces[seg.space].zero_preserving = False
    op.walk.pieces[op.node] = [chan] + [None] * (len(shapes) - 1)  # (out, saved mean, saved invstd)


def _conv(transposed: bool | None, groups_at: int) -> OpRule:
    """``conv_transpose{1,2,3}d(x, w, b, stride, padding, output_padding, groups)`` and ``convolution``."""
    def rule(op: Op) -> None:
        weight, bias = call_arg(op, 1, "weight"), call_arg(op, 2, "bias")
        groups = call_arg(op, groups_at, "groups", 1)
        flipped = call_arg(op, 6, "transposed") if transposed is None else transposed
        w_name, b_name, shape, w_shape = param_name(weight), param_name(bias), op.shape(op.input), op.shape(weight)
        if w_name is None or (bias is not None and b_name is None) or not isinstance(groups, int) \
                or shape is None or w_shape is None or not isinstance(flipped, bool):
            op.unknown(f"{op.describe()} on a weight that is not a parameter")
            return
        c_out = w_shape[1] * groups if flipped else w_shape[0]
        _channels(op, _Conv(w_name, b_name, shape[1], c_out, groups, flipped))
    return rule


def _addmm(op: Op) -> None:
    """``addmm(bias, x, W)``: ``x (N, in) @ W (in, out) + bias``, a Linear whose weight is stored transposed
    (GPT-2's ``Conv1D``): column ``k`` of ``W`` and ``bias[k]`` write neuron ``k``, row ``j`` reads feature ``j``."""
    bias, x, weight = op.node.args[:3]
    w_name, b_name, w_shape = param_name(weight), param_name(bias), op.shape(weight)
    if w_name is None or b_name is None or w_shape is None or len(w_shape) != 2 or op.shape(bias) != w_shape[1:]:
        op.unknown("addmm of computed tensors")
        return
    op.consume(op.channels(x), w_name, 0, channel_dim=1)
    op.produce(w_shape[1], dim=1, params=[(w_name, 1), b_name], kind="neuron")


def _by_parameter(op: Op) -> bool:
    """``mm``/``matmul(x, W)`` with ``W (in, out)`` a parameter: as :func:`_addmm` without a bias."""
    x, weight = op.node.args[:2]
    w_name, w_shape, shape = param_name(weight), op.shape(weight), op.shape(x)
    if w_name is None or w_shape is None or len(w_shape) != 2 or not shape:
        return False
    last = len(shape) - 1
    op.consume(op.channels(x), w_name, 0, channel_dim=last)
    op.produce(w_shape[1], dim=last, params=[(w_name, 1)], kind="neuron")
    return True


def _view_around_channels(op: Op) -> bool:
    """A view that reshapes only the dims after the channels (``(B, C, H, W) → (B, C, H·W)``) or only those
    before them (``(B, T, C) → (B·T, C)``): row-major order keeps each channel's entries together, so the
    channel dim stays, counted from the front or from the end. Other views go to the ``"view"`` rule
    (a flatten of the channels into a Linear, channel shuffles)."""
    chan, src, dst = op.channels(op.input), op.shape(op.input), op.shape()
    if chan is None or src is None or dst is None or src == dst:
        return False
    d, tail = chan.dim, len(src) - chan.dim  # tail: the channel dim and the dims after it
    if tuple(dst[:d + 1]) == tuple(src[:d + 1]):
        op.output(chan)
    elif len(dst) >= tail and tuple(dst[len(dst) - tail:]) == tuple(src[d:]):
        op.output(chan.moved_to(len(dst) - tail))
    else:
        return False
    return True


def _moved(op: Op, dim: Callable[[Channels, tuple[int, ...], tuple[int, ...]], int | None], what: str) -> None:
    """An op that moves the channel dim without mixing channels; ``dim(chan, src, dst)``: where, or None."""
    chan, src, dst = op.channels(op.input), op.shape(op.input), op.shape()
    if chan is None:
        return
    new = dim(chan, src, dst) if src is not None and dst is not None else None
    if new is None:
        op.unknown(what)
        return
    op.output(chan.moved_to(new))


def _permute(op: Op) -> None:
    order = [d % len(op.shape()) for d in op.node.args[1]]
    _moved(op, lambda c, s, d: order.index(c.dim), "a permute")


def _t(op: Op) -> None:
    _moved(op, lambda c, s, d: 1 - c.dim if len(s) == 2 else c.dim, "a transpose")


def _unsqueeze(op: Op) -> None:
    _moved(op, lambda c, s, d: c.dim + (op.node.args[1] % len(d) <= c.dim), "an unsqueeze")


def _squeeze(op: Op) -> None:
    def dim(c: Channels, s: tuple[int, ...], d: tuple[int, ...]) -> int | None:
        dims = call_arg(op, 1, "dim", range(len(s)))
        gone = {i % len(s) for i in ((dims,) if isinstance(dims, int) else dims) if s[i % len(s)] == 1}
        return None if c.dim in gone else c.dim - sum(i < c.dim for i in gone)
    _moved(op, dim, "a squeeze of the channel dim")


def _expand(op: Op) -> None:
    def dim(c: Channels, s: tuple[int, ...], d: tuple[int, ...]) -> int | None:
        new = c.dim + len(d) - len(s)  # expand prepends dims and broadcasts size-1 ones
        return new if d[new] == s[c.dim] else None
    _moved(op, dim, "an expand of the channel dim")


def _select(op: Op) -> None:
    def dim(c: Channels, s: tuple[int, ...], d: tuple[int, ...]) -> int | None:
        at = op.node.args[1] % len(s)
        return None if at == c.dim else c.dim - (at < c.dim)
    _moved(op, dim, "selecting one channel")


def _slice(op: Op) -> None:
    def dim(c: Channels, s: tuple[int, ...], d: tuple[int, ...]) -> int | None:
        at = call_arg(op, 1, "dim", 0) % len(s)
        return None if at == c.dim and d[at] != s[at] else c.dim  # a part of the channels: sizes are literal
    _moved(op, dim, "a slice of the channels")


def _index(op: Op) -> None:
    """``x[idx]`` with index tensors on dims before the channels only: the channel dim and the ones after stay last."""
    def dim(c: Channels, s: tuple[int, ...], d: tuple[int, ...]) -> int | None:
        indices = op.node.args[1]
        if any(i is not None for i in indices[c.dim:]):
            return None
        new = len(d) - (len(s) - c.dim)
        return new if tuple(d[new:]) == tuple(s[c.dim:]) else None
    _moved(op, dim, "indexing into the channels")


def _power(op: Op) -> None:
    """``x ** p`` with a constant ``p``: elementwise; 0 stays 0 for ``p > 0``."""
    p = op.node.args[1]
    Elementwise(zero_preserving=isinstance(p, (int, float)) and p > 0)(op)


def _hardtanh(op: Op) -> None:
    low, high = call_arg(op, 1, "min_val", -1.0), call_arg(op, 2, "max_val", 1.0)
    Elementwise(zero_preserving=low <= 0 <= high)(op)


# -- the table ------------------------------------------------------------------------------------

_ELEMENTWISE = Elementwise()
_NOT_ZERO_PRESERVING = Elementwise(zero_preserving=False)


def _packets(names: str) -> list[Any]:
    """The aten packets of these names that this torch build has."""
    found = []
    for name in names.split():
        try:
            found.append(getattr(_aten, name))
        except (AttributeError, RuntimeError):
            continue
    return found


def _build() -> dict[Any, _Via]:
    table: dict[Any, _Via] = {}

    def put(names: str, via: _Via) -> None:
        table.update(dict.fromkeys(_packets(names), via))

    for name, fn in (("conv1d", F.conv1d), ("conv2d", F.conv2d), ("conv3d", F.conv3d), ("linear", F.linear),
                     ("layer_norm", F.layer_norm), ("rms_norm", getattr(F, "rms_norm", None)),
                     ("group_norm", F.group_norm), ("scaled_dot_product_attention", F.scaled_dot_product_attention),
                     ("cat", torch.cat), ("split split_with_sizes", torch.split), ("transpose", torch.transpose),
                     ("mean", torch.mean), ("pad", F.pad), ("pixel_shuffle", F.pixel_shuffle),
                     ("pixel_unshuffle", F.pixel_unshuffle), ("bmm", torch.bmm), ("contiguous", "contiguous"),
                     ("clone", "clone"), ("dropout feature_dropout alpha_dropout", F.dropout),
                     ("relu relu_", F.relu), ("gelu gelu_", F.gelu), ("silu silu_", F.silu), ("tanh tanh_", torch.tanh),
                     ("sigmoid sigmoid_", torch.sigmoid), ("hardswish hardswish_", F.hardswish),
                     ("hardsigmoid hardsigmoid_", F.hardsigmoid), ("leaky_relu leaky_relu_", F.leaky_relu),
                     ("elu elu_", F.elu), ("add add_", operator.add), ("sub sub_ rsub", operator.sub),
                     ("mul mul_", operator.mul), ("div div_", operator.truediv)):
        put(name, _Via(fn))
    for d in (1, 2, 3):  # pooling: channels along dim 1, as the functional forms
        for name in ("max_pool", "avg_pool", "adaptive_avg_pool", "_adaptive_avg_pool"):
            put(f"{name}{d}d", _Via(getattr(F, f"{name.lstrip('_')}{d}d")))
    put("upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d upsample_bilinear2d "
        "upsample_bicubic2d upsample_trilinear3d _upsample_nearest_exact1d _upsample_nearest_exact2d "
        "_upsample_nearest_exact3d", _Via(F.interpolate))
    put("view reshape _unsafe_view unflatten", _Via("view", first=_view_around_channels))
    put("flatten", _Via("flatten", first=_view_around_channels))
    put("matmul mm", _Via(torch.matmul, first=_by_parameter))
    put("to _to_copy type_as alias detach detach_ lift_fresh_copy", _Via("to", _ELEMENTWISE))
    for names, rule in (("neg abs sqrt sin erf", _ELEMENTWISE), ("exp cos rsqrt reciprocal", _NOT_ZERO_PRESERVING)):
        for name in names.split():  # 0 stays 0, or not
            put(f"{name} {name}_", _Via(getattr(torch, name), rule))
    put("mish mish_", _Via(F.mish, _ELEMENTWISE))
    put("softplus", _Via(F.softplus, _NOT_ZERO_PRESERVING))
    put("hardtanh hardtanh_", _Via(F.hardtanh, _hardtanh))
    put("embedding", _Via(None, _embedding))
    put("batch_norm native_batch_norm _native_batch_norm_legit_no_training", _Via(None, _batch_norm))
    for d in (1, 2, 3):
        put(f"conv_transpose{d}d", _Via(getattr(F, f"conv_transpose{d}d"), _conv(True, 6)))
    put("convolution", _Via(torch.convolution, _conv(None, 8)))
    put("addmm", _Via(torch.addmm, _addmm))
    put("chunk", _Via(torch.chunk))  # same arguments: tensor_rules.split knows aten.chunk for its tie
    put("permute", _Via(torch.permute, _permute, native=T.permute))
    put("t", _Via(torch.t, _t))
    put("unsqueeze", _Via(torch.unsqueeze, _unsqueeze))
    put("squeeze", _Via(torch.squeeze, _squeeze))
    put("expand", _Via("expand", _expand))
    put("select", _Via(torch.select, _select))
    put("slice", _Via(None, _slice))
    put("index", _Via(None, _index))
    table[_aten.pow.Tensor_Scalar] = _Via(torch.pow, _power)  # not pow.Scalar (2 ** x): its tensor is the exponent
    return table


_TABLE = _build()
