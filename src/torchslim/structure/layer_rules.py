"""Built-in rules for layers with weights: Linear, Embedding, BatchNorm (modules and functions), LSTM/GRU.

Convolutions are in :mod:`~torchslim.structure.conv_rules`.
"""

from __future__ import annotations

import logging

import torch.fx as fx
from torch import nn

from torchslim.errors import UnsupportedOperation
from torchslim.structure.conv_rules import call_arg, param_name
from torchslim.structure.groups import Stripe
from torchslim.structure.layout import Channels, Segment, Stack
from torchslim.structure.op import Op

log = logging.getLogger(__name__)


def _outputs(op: Op, bias: bool) -> list[str]:
    return [op.param("weight")] + ([op.param("bias")] if bias else [])


def linear(op: Op) -> None:
    """A Linear over the last dim: its columns read the input's features, its rows open a space of neurons."""
    shape = op.shape(op.input)
    last = len(shape) - 1 if shape else 1
    op.consume(op.channels(op.input), op.param("weight"), 1, channel_dim=last)
    op.produce(op.module.out_features, dim=last, params=_outputs(op, op.module.bias is not None), kind="neuron")


def linear_fn(op: Op) -> None:
    """``F.linear(x, weight, bias)`` on parameters (``get_attr`` nodes): the same op as an ``nn.Linear``."""
    weight, bias = call_arg(op, 1, "weight"), call_arg(op, 2, "bias")
    w_name, b_name, shape = param_name(weight), param_name(bias), op.shape(op.input)
    if w_name is None or (bias is not None and b_name is None) or not shape or len(op.shape(weight)) != 2:
        op.unknown(f"{op.describe()} on a weight that is not a parameter")
        return
    last = len(shape) - 1
    op.consume(op.channels(op.input), w_name, 1, channel_dim=last)
    op.produce(op.shape(weight)[0], dim=last, params=[w_name] + ([b_name] if b_name else []), kind="neuron")


def embedding(op: Op) -> None:
    """Token ids in, a new feature space out: column ``k`` of the table.

    Its kind stays ``"neuron"`` (an LSTM LM's embedding width); a LayerNorm/RMSNorm over the features
    of ``(B, T, C)`` tokens marks the class it joins ``"embed"``, the model width
    (:mod:`~torchslim.structure.norm_rules`).
    """
    op.produce(op.module.embedding_dim, dim=len(op.shape()) - 1, params=[(op.param("weight"), 1)], kind="neuron")


def batchnorm(op: Op) -> None:
    """γ, β and the running statistics go with their channel; without γ, β, (0 − mean)/std is not 0."""
    mod, chan = op.module, op.channels(op.input)
    if chan is None:
        return
    if chan.dim != 1:
        op.unknown(f"{type(mod).__name__} over a non-channel dimension")
        return
    if mod.affine:
        op.attach(chan, op.param("weight"), 0, "out")
        op.attach(chan, op.param("bias"), 0, "out")
    if mod.track_running_stats:
        op.attach(chan, op.param("running_mean"), 0, "state")
        op.attach(chan, op.param("running_var"), 0, "state")
    op.output(chan, zero_preserving=mod.affine)


def batchnorm_fn(op: Op) -> None:
    """``F.batch_norm(x, mean, var, weight, bias, …)`` on a module's parameters and buffers (``BatchNormAct2d``).

    Each of them that is given goes with its channel, as in :func:`batchnorm`; with γ, a channel with
    zero γ and β stays zero. Statistics or affine terms that are computed tensors are an unknown case.
    """
    chan = op.channels(op.input)
    if chan is None:
        return  # e.g. a weight standardized by batch_norm: no channels flow through it
    if chan.dim != 1:
        op.unknown("batch_norm over a non-channel dimension")
        return
    args = {k: call_arg(op, i, k) for i, k in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))}
    names = {k: param_name(a) for k, a in args.items()}
    if any(a is not None and names[k] is None for k, a in args.items()):
        op.unknown("batch_norm with computed statistics or affine terms")
        return
    for key, role in (("weight", "out"), ("bias", "out"), ("running_mean", "state"), ("running_var", "state")):
        if names[key] is not None:
            op.attach(chan, names[key], 0, role)
    op.output(chan, zero_preserving=names["weight"] is not None)


def rnn(op: Op) -> None:
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
    mod, name = op.module, op.path
    if getattr(mod, "proj_size", 0):
        why = f"'{name}' is an LSTM with proj_size > 0: its hidden units are not removable (no ISS groups)"
        if op.strict:
            raise UnsupportedOperation(f"{why}; pass strict=False to skip it, or build it without proj_size")
        log.info(why)
        op.unknown("an LSTM with proj_size > 0")
        return
    pinned = _initial_state(op)
    chan = op.channels(op.input)
    dirs = ["", "_reverse"] if mod.bidirectional else [""]
    if chan is not None and chan.dim != len(op.shape(op.input)) - 1:
        op.fix(chan, f"'{name}' reads a dimension other than the features")
    elif chan is not None:
        for sfx in dirs:
            op.attach(chan, op.param(f"weight_ih_l0{sfx}"), 1, "in")
    spaces = [_rnn_layer(op, layer, sfx, dirs, pinned) for layer in range(mod.num_layers) for sfx in dirs]
    hidden = mod.hidden_size
    last = len(op.shape(op.input) or (0, 0, 0)) - 1
    out = Channels(last, tuple(Segment(sid, 0, hidden, offset=i * hidden) for i, sid in enumerate(spaces[-len(dirs):])))
    h = Stack(tuple(Channels(1, (Segment(sid, 0, hidden),)) for sid in spaces))  # h_n[i]: (N, H)
    op.walk.pieces[op.node] = [out, [h, h] if isinstance(mod, nn.LSTM) else h]  # LSTM: (h_n, c_n)


def _initial_state(op: Op) -> str | None:
    """Why the hidden size is pinned by an explicit initial state (its channels pinned too), or None."""
    name = op.path
    state = op.node.args[1] if len(op.node.args) > 1 else op.node.kwargs.get("hx")
    if isinstance(state, fx.Node) and state.meta.get("type") is type(None):
        state = None  # a None-defaulting forward argument, None in the traced run: a zero start
    if state is None:
        return None
    pinned = (f"'{name}' is called with an explicit initial state: it pins the hidden size, "
              "since compaction does not cut the state")
    if op.strict:
        raise UnsupportedOperation(
            f"{pinned}. Start '{name}' from a zero state (call it without one, or with None) "
            "to make its hidden units removable, or pass strict=False to keep them all")
    log.info("%s; its hidden units are kept", pinned)
    found: list[fx.Node] = []
    fx.node.map_arg(state, lambda n: found.append(n) or n)
    op.pin(pinned, found)  # the state's own channels (a Linear's neurons, another RNN's h_n) keep H too
    return pinned


def _rnn_layer(op: Op, layer: int, sfx: str, dirs: list[str], pinned: str | None) -> int:
    """The space of one layer and direction: its gate rows, its recurrent and next-layer columns."""
    mod, name = op.module, op.path
    gates, hidden = (4 if isinstance(mod, nn.LSTM) else 3), mod.hidden_size
    sid = op.walk.graph.new(hidden, fixed=pinned)
    space = op.walk.graph.spaces[sid]
    space.producers.append(f"{name}.l{layer}{sfx}")
    space.producer_kind.add("hidden")
    space.rnn = name
    names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if mod.bias else [])
    space.stripes += [Stripe(f"{name}.{w}_l{layer}{sfx}", 0, offset=g * hidden) for w in names for g in range(gates)]
    space.stripes.append(Stripe(f"{name}.weight_hh_l{layer}{sfx}", 1, role="in"))
    if layer + 1 < mod.num_layers:
        space.stripes += [Stripe(f"{name}.weight_ih_l{layer + 1}{s2}", 1, role="in", offset=dirs.index(sfx) * hidden)
                          for s2 in dirs]
    return sid
