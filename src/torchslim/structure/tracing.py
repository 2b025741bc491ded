"""Model → channel-dependency graph → groups.

We trace with ``torch.fx.symbolic_trace`` (module calls stay visible as ``call_module`` nodes named
like the model's attributes, which is what group names and compaction need), or with ``torch.export``
where fx cannot (aten ops that name their module and parameters), and know every node's shape for the
example inputs (:mod:`~torchslim.structure.capture`). Every tensor that carries channels is
tagged with its *segments* (:mod:`~torchslim.structure.layout`): runs of channels, each a range of a
*space* (the channel dimension some Conv2d/Linear produced). Each operation's rule, from one table
(:mod:`~torchslim.structure.rules`, which ``torchslim.register_op`` extends), says what happens to
them: per-channel operations pass the segments on, ``cat`` joins and ``split``/``chunk`` cut them, a residual
addition or a per-channel product unites the spaces of its operands, consumers record which of their
input columns read each member (:mod:`~torchslim.structure.walker`). A space that reaches the network's
output, comes from its input, or meets an operation no rule covers is *fixed*: none of its channels
becomes a group.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import torch.fx as fx
from torch import Tensor, nn

from torchslim._inputs import Inputs, as_tuple
from torchslim.errors import UnknownOpWarning, UnsupportedOperation
from torchslim.layers import is_rank_family
from torchslim.structure.capture import Capture, without_kv_cache
from torchslim.structure.capture import capture as _capture
from torchslim.structure.graph import _DependencyGraph
from torchslim.structure.groups import (
    KINDS,
    SIDES,
    Family,
    Group,
    Stripe,
    side_families,
)
from torchslim.structure.layout import Channels as _Chan  # noqa: F401  (tests/surgery/test_ties.py)
from torchslim.structure.layout import Segment as _Seg  # noqa: F401
from torchslim.structure.norm_rules import functional_norms
from torchslim.structure.rules import rule_for
from torchslim.structure.walker import walk

__all__ = ["UnknownOpWarning", "channel_graph", "coupled_families", "layer_families", "structures", "warn_pinned"]


_LISTED = 10  # unknown operations a warning names
# a class of united spaces takes the first kind any of its spaces was given (``op.produce(kind=)`` or
# ``space.producer_kind``): attention heads and the model width win over the layers' own kinds
_KIND_ORDER = ("head", "embed", "channel", "hidden", "neuron")


def channel_graph(model: nn.Module, example_inputs: Tensor | tuple[Tensor, ...], *, strict: bool = False,
                  leaf_modules: Sequence[type[nn.Module]] = (),
                  capture: Capture = "auto") -> tuple[_DependencyGraph, fx.GraphModule]:
    """Trace ``model`` on ``example_inputs`` and walk it: its channel-dependency graph and the GraphModule.

    ``capture``: ``"fx"``, ``"export"`` or ``"auto"`` (fx, and torch.export where fx cannot trace); see
    :func:`torchslim.structure.capture.capture`.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with functional_norms(model), without_kv_cache(model):  # norms written out in Python are captured as one op
        gm = _capture(model, inputs, leaf_modules, capture)
    gm.meta["torchslim_model"] = model  # rules read the user's modules' attributes (a head count: heads_layout)
    return walk(gm, strict, rule_for), gm


def warn_pinned(graph: _DependencyGraph, stacklevel: int = 3) -> None:
    """One :class:`UnknownOpWarning` listing how many channels each unknown operation pinned, if any did."""
    if not graph.pinned:
        return
    listed = [f"{what}: {n} channel{'s' * (n != 1)}" for what, n in graph.pinned.items()]
    ops = "; ".join(listed[:_LISTED]) + (f"; and {len(listed) - _LISTED} more" if len(listed) > _LISTED else "")
    warnings.warn(
        f"torchslim could not follow channels through {len(graph.pinned)} operation(s), so their input "
        f"channels stay out of every group: {ops}. Teach it an op with torchslim.register_op(target, "
        "'elementwise' | 'opaque' | a handler), or pass strict=True to raise at the first one.",
        UnknownOpWarning, stacklevel=stacklevel)


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
        kind = next((k for k in _KIND_ORDER if k in kinds), "neuron")
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
            read_by_norm=any(s.read_by_norm for s in spaces),
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
    capture: Capture = "auto",
) -> list[Group]:
    """The groups of ``model`` that SSL regularizes and compaction removes.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace or ``torch.export`` can capture.
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
            followed (it names the op and its module); without it, such an op's input channels stay
            out of the groups and one :class:`UnknownOpWarning` per call says how many each pinned.
            :func:`~torchslim.structure.rules.register_op` teaches the tracer an op.
        leaf_modules: module types not to trace into: each call is one op, followed by its rule
            (matched by ``isinstance``: a ``BatchNorm2d`` subclass is a BatchNorm) or, without one,
            handled as unknown as above. They apply to a torch.fx trace only.
        capture: how the graph is captured: ``"fx"`` (``torch.fx`` symbolic tracing: module calls stay
            ops, so module rules and ``leaf_modules`` apply), ``"export"`` (``torch.export``: aten ops,
            for Hugging Face transformers and forwards that branch on shapes) or ``"auto"``, fx and
            export where fx cannot trace.

    Returns:
        Groups in model order; each knows its parameters, so ``g.norm()`` and ``g.zero_()`` work.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise UnsupportedOperation(f"unknown group kind(s) {unknown}; choose from {list(KINDS)}")
    families: list[Family] = []
    if {"channel", "neuron", "depth", "hidden", "rank", "head", "embed", *SIDES} & set(kinds) or strict:
        graph, gm = channel_graph(model, as_tuple(example_inputs), strict=strict, leaf_modules=leaf_modules,
                                  capture=capture)
        warn_pinned(graph)
        coupled = coupled_families(model, graph)
        families += [f for f in coupled if f.kind in kinds] + side_families(coupled, kinds)
        if "depth" in kinds:
            from torchslim.structure.depth import (  # depth builds on this module
                depth_families,
                residual_branches,
            )

            families += depth_families(model, residual_branches(model, gm))
    families += layer_families(model, kinds)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    families.sort(key=lambda f: (order.get(f.label.split("+")[0], 0), KINDS.index(f.kind)))
    return [Group(f, k) for f in families for k in range(f.size)]
