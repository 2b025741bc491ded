"""Depth: residual branches as groups, and blocks that become their shortcut once a branch is zero.

SSL's depth-wise structure (Wen et al., NIPS 2016, §3.3) regularizes all weights of a residual branch
``f`` in ``y = post(f(x) + shortcut(x))`` as one group. When the group reaches zero, ``f(x) = 0`` and
the block computes ``post(shortcut(x))``: compaction replaces the block by
``nn.Sequential(*shortcut_modules, *post_modules)``, a standard module.

A branch is found by tracing (:func:`torchslim.structure.tracing.channel_graph`'s torch.fx graph): an addition of
two same-shape tensors inside one module (the *block*, from fx's ``nn_module_stack``), whose operands
are the branch (the side with more parameters) and the shortcut (the block input, or a chain of
modules on it), followed by a chain of modules or ReLUs up to the block's output. A parameter the
block multiplies into its branch directly (ConvNeXt's ``layer_scale * block(x)``, a ``get_attr``
node times a branch value) belongs to the branch too. Anything else (a block with two additions, a
shortcut that is not a plain chain, parameters shared with other layers or used otherwise than as
such a factor) yields no depth group.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from torchslim.structure.groups import Family, Stripe

__all__ = ["Branch", "depth_families", "remove_branches", "residual_branches"]

_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_RELU = {F.relu, torch.relu, "relu", "relu_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_PRODUCERS = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
_SCALERS = {"StochasticDepth", "stochastic_depth", "dropout"}  # drop-path and dropout: 0 stays 0


@dataclass(frozen=True)
class Branch:
    """One removable residual branch: ``block`` computes ``post(branch(x) + shortcut(x))``.

    ``modules`` are the branch's modules and ``params`` the parameters it multiplies in directly (a
    per-channel scale such as ConvNeXt's ``layer_scale``); together their parameters form the depth
    group. ``shortcut`` and ``post`` are the module names (or ``"relu"``) the block becomes when the
    branch is zero. The branch ends in a Conv/Linear/affine BatchNorm or in a product with one of
    ``params``, so zero weights make its output exactly zero.
    """

    block: str
    modules: tuple[str, ...]
    shortcut: tuple[str, ...]
    post: tuple[str, ...]
    params: tuple[str, ...] = ()


def _scope(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return next(reversed(stack)).split("@")[0]


def _inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _chain_back(node: fx.Node, stop: fx.Node) -> list[fx.Node] | None:
    """The single-input call_module nodes from ``stop`` to ``node`` (in order), or None if not a chain."""
    chain = []
    while node is not stop:
        if node.op != "call_module" or len(node.all_input_nodes) != 1:
            return None
        chain.append(node)
        node = node.all_input_nodes[0]
    return chain[::-1]


def _post_chain(add: fx.Node, block: str) -> list[str] | None:
    """Modules or "relu" applied after the addition up to the block's output; None if not a plain chain."""
    post, node = [], add
    while True:
        inside = [u for u in node.users if _scope(u) is not None and _inside(_scope(u), block)]
        if not inside:
            return post if len(node.users) >= 1 else None
        if len(inside) != 1 or len(node.users) != 1:
            return None
        node = inside[0]
        if node.op == "call_module" and len(node.all_input_nodes) == 1:
            post.append(str(node.target))
        elif node.op in ("call_function", "call_method") and node.target in _RELU and len(node.all_input_nodes) == 1:
            post.append("relu")
        else:
            return None


def residual_branches(model: nn.Module, gm: fx.GraphModule) -> list[Branch]:
    """Every residual branch of ``gm`` (a trace of ``model``) that compaction could remove."""
    nodes = list(gm.graph.nodes)
    adds = [n for n in nodes if n.op in ("call_function", "call_method") and n.target in _ADD
            and len(n.all_input_nodes) == 2 and _scope(n)]
    per_block: dict[str, int] = {}
    for n in adds:
        per_block[_scope(n)] = per_block.get(_scope(n), 0) + 1
    calls: dict[str, int] = {}
    attr_uses: dict[int, int] = {}                       # parameter -> get_attr nodes reading it
    for n in nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
        elif n.op == "get_attr" and (p := _parameter(model, str(n.target))) is not None:
            attr_uses[id(p)] = attr_uses.get(id(p), 0) + 1
    in_modules = {id(p) for m in calls for p in model.get_submodule(m).parameters()}
    shared = {i for i, k in attr_uses.items() if k != 1} | in_modules
    out = []
    for add in adds:
        block = _scope(add)
        if per_block[block] != 1 or not block:
            continue
        a, b = add.all_input_nodes
        if a.meta.get("tensor_meta") is None or b.meta.get("tensor_meta") is None \
                or a.meta["tensor_meta"].shape != b.meta["tensor_meta"].shape:
            continue
        branch = _classify(model, block, add, calls, shared)
        post = _post_chain(add, block)
        if branch is not None and post is not None:
            mods, shortcut, params = branch
            out.append(Branch(block, mods, shortcut, tuple(post), params))
    return out


def _parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    try:
        return model.get_parameter(name)
    except AttributeError:                                             # a buffer or a plain attribute
        return None


def _scale(model: nn.Module, node: fx.Node, block: str, shared: set[int]) -> str | None:
    """The parameter name if ``node`` (a get_attr) is a factor the block multiplies into its branch.

    That is: a parameter of the block (not a buffer), read by this node only, not also a parameter
    of a called module, whose single use is ``p * y`` with ``y`` a traced value of the product's
    shape (the parameter scales ``y``; it does not broadcast it to a larger tensor).
    """
    name = str(node.target)
    p = _parameter(model, name)
    if p is None or not _inside(name, block) or id(p) in shared or len(node.users) != 1:
        return None
    mul = next(iter(node.users))
    if mul.op not in ("call_function", "call_method") or mul.target not in _MUL \
            or len(mul.all_input_nodes) != 2 or mul.kwargs:
        return None
    other = next((i for i in mul.all_input_nodes if i is not node), None)
    if other is None or other.op == "get_attr" or _meta_shape(other) is None \
            or _meta_shape(other) != _meta_shape(mul):
        return None
    return name


def _meta_shape(node: fx.Node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "shape", None)


def _classify(model: nn.Module, block: str, add: fx.Node, calls: dict[str, int],
              shared: set[int]) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None:
    """``(branch modules, shortcut modules, branch scale parameters)`` for ``add = a + b``, or None.

    The heavier side is the branch.
    """
    a, b = add.all_input_nodes
    anc_a, anc_b = _ancestors(a), _ancestors(b)
    sides = []
    for own, out in ((anc_a - anc_b, a), (anc_b - anc_a, b)):
        mods = [str(n.target) for n in own if n.op == "call_module"]
        attrs = [n for n in own if n.op == "get_attr"]
        size = sum(p.numel() for m in mods for p in model.get_submodule(m).parameters())
        size += sum(p.numel() for n in attrs if (p := _parameter(model, str(n.target))) is not None)
        sides.append((size, own, out, mods, attrs))
    sides.sort(key=lambda s: -s[0])
    (n_branch, own, out, mods, attrs), (n_short, short_own, short_out, _, _) = sides
    if n_branch == 0 or n_branch == n_short:
        return None
    if any(not _inside(m, block) or (calls[m] != 1 and _has_params(model, m)) for m in mods):
        return None                                                    # weights shared, or outside the block
    params = [_scale(model, n, block, shared) for n in attrs]
    if any(p is None for p in params):                                 # a parameter used otherwise: not handled
        return None
    if any(u not in own | short_own and u is not add for n in own | short_own for u in n.users):
        return None                                                    # a value escapes the block
    entry = [n for n in (own | short_own) if n.all_input_nodes and any(i not in own | short_own
                                                                       for i in n.all_input_nodes)]
    start = {i for n in entry for i in n.all_input_nodes if i not in own | short_own}
    if len(start) != 1:
        return None
    x = start.pop()
    chain = _chain_back(short_out, x) if short_out is not x else []
    if chain is None or any(calls[str(n.target)] != 1 and _has_params(model, str(n.target)) for n in chain):
        return None
    if _last_producer(model, out, set(params)) is None:
        return None
    return tuple(sorted(mods)), tuple(str(n.target) for n in chain), tuple(sorted(params))


def _has_params(model: nn.Module, name: str) -> bool:
    return next(model.get_submodule(name).parameters(), None) is not None


def _last_producer(model: nn.Module, node: fx.Node, params: set[str]) -> str | None:
    """What makes the branch's output, through dropout-like passes: a Conv/Linear/affine-BatchNorm
    module, or a product with one of the branch's scale ``params`` (zero when that parameter is)."""
    while node.all_input_nodes:
        scales = [str(i.target) for i in node.all_input_nodes if i.op == "get_attr" and str(i.target) in params]
        if node.op in ("call_function", "call_method") and node.target in _MUL and scales:
            return scales[0]
        if node.op == "call_module":
            mod = model.get_submodule(str(node.target))
            if isinstance(mod, _PRODUCERS) and (not isinstance(mod, nn.modules.batchnorm._BatchNorm) or mod.affine):
                return str(node.target)
            if not isinstance(mod, (nn.Dropout, nn.Identity)) and type(mod).__name__ not in _SCALERS:
                return None
        elif getattr(node.target, "__name__", None) not in _SCALERS:
            return None
        node = node.all_input_nodes[0]  # a per-sample scaling of zero is zero
    return None


def depth_families(model: nn.Module, branches: Sequence[Branch]) -> list[Family]:
    """One ``depth`` family (a single group) per branch: every parameter of its modules, and its scales."""
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    families = []
    for br in branches:
        names = [f"{m}.{name}" for m in br.modules
                 for name, _ in model.get_submodule(m).named_parameters(recurse=False)]
        names += [n for n in br.params if n not in names]
        stripes = []
        for name in names:
            p = model.get_parameter(name)
            if p.dim() == 0:                                           # a scalar: its flattening (1,) is the row
                stripes.append(Stripe(name, 0, width=1, flat=True, hi=1))
            else:
                stripes.append(Stripe(name, 0, width=p.shape[0], hi=1))
        if stripes:
            families.append(Family("depth", br.block, 1, tuple(stripes), params))
    return families


@torch.no_grad()
def _is_zero(model: nn.Module, br: Branch) -> bool:
    return all(not p.any() for m in br.modules for p in model.get_submodule(m).parameters()) \
        and all(not model.get_parameter(n).any() for n in br.params)


def remove_branches(model: nn.Module, branches: Sequence[Branch]) -> list[str]:
    """Replace each block whose branch is all zero by its shortcut and post chain, in place; their names."""
    done: list[str] = []
    for br in branches:
        if not _is_zero(model, br) or any(_inside(br.block, d) for d in done):
            continue
        parts = [m for m in map(model.get_submodule, br.shortcut) if not isinstance(m, nn.Identity)]
        parts += [nn.ReLU() if p == "relu" else model.get_submodule(p) for p in br.post]
        parent, _, attr = br.block.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Sequential(*parts) if parts else nn.Identity())
        done.append(br.block)
    return done
