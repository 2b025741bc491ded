"""The table of op rules: what the tracer knows about each module type, function and method.

Keys are matched as follows:

* a module class (``nn.Conv2d``): module calls whose module is an instance, the most derived
  registered class first (along the MRO);
* a function object (``torch.cat``, ``F.relu``, ``operator.add``): function calls of exactly it;
* a string without a dot (``"view"``): method calls of that name (``x.view(...)``), and module calls
  whose class (or a base class) has that ``__name__`` (for classes we must not import);
* a dotted string (``"torchvision.ops.stochastic_depth.stochastic_depth"``): the class or function
  with that ``__module__`` and ``__qualname__``.

Rules a user registers (:func:`register_op`) come before the built-in ones for the same key.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from torchslim.errors import ConfigError
from torchslim.layers import padded_std_conv
from torchslim.structure import aten_rules as A
from torchslim.structure import attention_rules as H
from torchslim.structure import conv_rules as C
from torchslim.structure import layer_rules as L
from torchslim.structure import norm_rules as N
from torchslim.structure import tensor_rules as T
from torchslim.structure.op import Elementwise, Opaque, OpRule
from torchslim.structure.shuffle import RESHAPES

Target = type | str | Callable[..., Any]  # a module class, a function, a method name or a qualified name

_ELEMENTWISE = Elementwise()
_NOT_ZERO_PRESERVING = Elementwise(zero_preserving=False)
_POOL = Elementwise(channel_dim=1)


def _builtin() -> dict[Any, OpRule]:
    table: dict[Any, OpRule] = {nn.LSTM: L.rnn, nn.GRU: L.rnn, nn.Embedding: L.embedding,
                                nn.Linear: L.linear, nn.BatchNorm1d: L.batchnorm, nn.BatchNorm2d: L.batchnorm,
                                nn.Flatten: T.reshape, operator.getitem: T.getitem}
    groups: list[tuple[OpRule, list[Any]]] = [
        (C.conv, [nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d]),
        (C.conv_fn, [F.conv1d, F.conv2d, F.conv3d]),
        (C.padded_std_conv_fn, [padded_std_conv]),
        (L.linear_fn, [F.linear]),
        (L.batchnorm, [nn.BatchNorm3d]),
        (L.batchnorm_fn, [F.batch_norm]),
        (_POOL, [nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, F.max_pool3d, F.avg_pool3d,
                 F.adaptive_avg_pool3d, F.adaptive_max_pool3d]),
        (_ELEMENTWISE, [
            nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.Mish,
            nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
            F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardswish, torch.tanh, F.dropout, F.elu,
            "relu", "relu_", "tanh", "contiguous", "clone",
            # torchvision's per-sample drop-path scales whole samples: channels stay apart (by name: tracing
            # does not import torchvision)
            "StochasticDepth", "torchvision.ops.stochastic_depth.stochastic_depth"]),
        (_NOT_ZERO_PRESERVING, [nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, torch.sigmoid, F.sigmoid, F.hardsigmoid,
                                "sigmoid"]),
        (_POOL, [nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
                 F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d]),
        (T.add, [operator.add, operator.iadd, torch.add, "add", "add_", operator.sub, torch.sub, "sub"]),
        (T.scale, [operator.mul, operator.imul, torch.mul, "mul", "mul_", operator.truediv, torch.div, "div"]),
        (T.cat, [torch.cat, torch.concat, torch.concatenate]),
        (T.split, [torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split"]),
        (T.reshape, [*RESHAPES, "reshape_as", "view_as"]),
        (T.permute, [torch.permute, "permute", torch.transpose, "transpose"]),
        (T.mean, [torch.mean, "mean"]),
        (_POOL, [nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, F.interpolate, F.upsample,
                 F.upsample_nearest, F.upsample_bilinear]),  # resampling the space after the channels
        (T.pad, [F.pad, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
                 nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
                 nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
                 *(getattr(nn, f"CircularPad{d}d") for d in (1, 2, 3) if hasattr(nn, f"CircularPad{d}d"))]),
        (T.pixel_shuffle, [nn.PixelShuffle, F.pixel_shuffle, torch.pixel_shuffle]),
        (T.pixel_unshuffle, [nn.PixelUnshuffle, F.pixel_unshuffle, torch.pixel_unshuffle]),
    ]
    for rule, targets in groups:
        table.update(dict.fromkeys(targets, rule))
    table.update(N.RULES)  # LayerNorm, RMSNorm, GroupNorm: the model width through normalization
    table.update(H.RULES)  # attention: heads
    return table


_BUILTIN = _builtin()
_USER: dict[Any, list[tuple[int, OpRule]]] = {}  # key -> registrations, the last one wins
_IDS = itertools.count()


def _qualname(obj: Any) -> str | None:
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    return f"{module}.{name}" if module and name else None


def _get(key: Any) -> OpRule | None:
    try:
        if key in _USER:
            return _USER[key][-1][1]
        return _BUILTIN.get(key)
    except TypeError:  # an unhashable target
        return None


def rule_for(node: fx.Node, module: nn.Module | None = None) -> OpRule | None:
    """The rule for a traced operation (``module``: the called module of a module call), or None."""
    if module is not None:
        for cls in type(module).__mro__:
            rule = _get(cls) or _get(cls.__name__) or _get(_qualname(cls))
            if rule is not None:
                return rule
        return None
    if node.op == "call_method":
        return _get(node.target)
    if isinstance(node.target, torch._ops.OpOverload):  # a graph captured by torch.export
        return A.aten_rule(node.target, _get)
    return _get(node.target) or _get(_qualname(node.target))


@dataclass(frozen=True)
class Registration:
    """A rule :func:`register_op` added; ``remove()`` (or leaving a ``with`` block) takes it out again."""

    target: Target
    rule: OpRule
    _id: int

    def remove(self) -> None:
        """Forget this registration: the rule before it (or the built-in one) applies again."""
        entries = _USER.get(self.target, [])
        entries[:] = [e for e in entries if e[0] != self._id]
        if not entries:
            _USER.pop(self.target, None)

    def __enter__(self) -> Registration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def register_op(target: Target, rule: Literal["elementwise", "opaque"] | OpRule, *,
                zero_preserving: bool = True) -> Registration:
    """Teach the tracer an operation: how channels go through ``target``.

    Args:
        target: a module class (matched by ``isinstance``, most derived class first), a function
            (``torch.roll``), a method name (``"roll"`` for ``x.roll(...)``), or a dotted qualified name of a
            class or function that should not be imported (``"timm.layers.norm_act.BatchNormAct2d"``).
        rule: ``"elementwise"``: output channel ``k`` depends only on input channel ``k`` (an
            activation); ``"opaque"``: the channels that enter are pinned (never a group) and the
            output carries none; or a handler, any callable ``rule(op)`` following
            :class:`torchslim.structure.op.OpRule` (a worked one is in ``docs/op_rules.md``).
        zero_preserving: for ``"elementwise"``: whether the op maps 0 to 0 (``x * sigmoid(x)`` does,
            ``sigmoid`` does not); a channel whose producers are all zero is then removable behind it.

    Returns:
        A :class:`Registration`: call ``.remove()``, or use it as a context manager, to undo it.
        A registration overrides the built-in rule for ``target`` until then.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torchslim import register_op, structures
        >>> class Swish(nn.Module):                      # torch.fx would trace into it: make it a leaf
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), Swish(), nn.Conv2d(8, 4, 1))
        >>> x = torch.randn(1, 3, 8, 8)
        >>> len(structures(net, x, leaf_modules=(Swish,)))   # an unknown leaf pins its channels
        0
        >>> with register_op(Swish, "elementwise"):
        ...     len(structures(net, x, leaf_modules=(Swish,)))
        8
    """
    if isinstance(rule, str):
        if rule not in ("elementwise", "opaque"):
            raise ConfigError(f"rule must be 'elementwise', 'opaque' or a handler rule(op), got {rule!r}")
        rule = Elementwise(zero_preserving=zero_preserving) if rule == "elementwise" else Opaque()
    elif not callable(rule):
        raise ConfigError(f"rule must be 'elementwise', 'opaque' or a callable rule(op), got {type(rule).__name__}")
    try:
        hash(target)
    except TypeError as e:
        raise ConfigError(f"target must be a module class, a function or a name, got {target!r}") from e
    registration = Registration(target, rule, next(_IDS))
    _USER.setdefault(target, []).append((registration._id, rule))
    return registration
