"""Rules for normalization over channels: LayerNorm, RMSNorm and GroupNorm, as modules, as functions on a
module's parameters, and as timm's and Hugging Face's classes; :func:`functional_norms` for capture.

A LayerNorm or RMSNorm over the channels mixes them through its statistics (μ, σ over all ``C``), so a
channel ``k`` is removable only when it is *silent*: every writer of it is zero (producers' rows, biases,
embedding columns, positional parameters, and the norm's own γ_k, β_k). It is then 0 before the norm
and γ_k·(0 − μ)/σ + β_k = 0 after it. Zero consumers' columns are not enough: the statistics read it.
So a norm rule

* attaches γ, β as ``"out"`` stripes of the channels and passes the channels on;
* marks their spaces ``read_by_norm`` (compaction then removes silent members only);
* records a :class:`~torchslim.structure.graph.NormSite`, with which compaction makes the norm exact over
  the kept channels (:mod:`torchslim.surgery.norms`): an RMSNorm with γ·sqrt(C/C') and ε·C/C', a LayerNorm
  as a :class:`~torchslim.layers.PaddedLayerNorm` whose statistics still count the ``C`` channels;
* marks the class ``"embed"`` when it normalizes the features of tokens ``(B, T, C)``: that class is a
  transformer's residual stream, the model width (token and position embeddings, every block's output
  rows, every norm's γ/β, every reader's columns, a tied LM head).

A norm the compact model could not fix is pinned with a reason: no γ (a LayerNorm maps a zero channel to
−μ/σ; an RMSNorm has nothing to take the rescaling), or an ``F.layer_norm``/``F.rms_norm`` that is one step
of a larger forward (its module cannot be swapped).

GroupNorm's statistics are per group, so its members are whole groups: the channels' class is coarsened
to ``num_groups`` blocks (as a grouped conv's), a block goes when it is silent or unread, the other
groups' statistics do not change, and compaction lowers ``num_groups``. ``num_groups == C`` is per channel.
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from torchslim.layers import padded_layer_norm
from torchslim.structure.capture import module_ops, module_path
from torchslim.structure.conv_rules import call_arg, param_name
from torchslim.structure.graph import NormSite
from torchslim.structure.layout import Channels
from torchslim.structure.op import Op, OpRule

# Hugging Face's RMSNorm classes: ``weight * x * rsqrt(mean(x²) + variance_epsilon)`` (not Gemma's 1 + weight)
HF_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
                "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm", "OlmoeRMSNorm", "GraniteRMSNorm")


# -- the common core ------------------------------------------------------------------------------

def _normalize(op: Op, chans: Channels, weight: str | None, bias: str | None, site: NormSite | None) -> None:
    """A LayerNorm/RMSNorm over ``chans``: γ, β write them, only silent members go, ``site`` is fixed when cut."""
    for name in (weight, bias):
        if name is not None:
            op.attach(chans, name, 0, "out")
    tokens = len(op.shape(op.input)) == 3 and chans.dim == 2  # (B, T, C): a transformer's residual stream
    for seg in chans.segs:
        space = op.walk.graph.spaces[seg.space]
        space.read_by_norm = True
        if tokens:
            space.producer_kind.add("embed")
    if site is not None:
        op.walk.graph.norms[site.module] = site
    op.output(chans)


def _pin(op: Op, chans: Channels, why: str) -> None:
    """Channels a norm reads but compaction could not keep exact: pinned, and passed on (pinned)."""
    op.fix(chans, f"{op.describe()} at {op.where()}: {why}")
    op.output(chans)


def _along(op: Op, chans: Channels | None, dim: int) -> Channels | None:
    """``chans`` when they lie along ``dim`` of the input (the normalized dim); otherwise unknown, None."""
    if chans is None:
        return None
    if chans.dim != dim % len(op.shape(op.input)):  # a module is named by its class, a function by what it does
        op.unknown(None if op.module is not None else f"{op.describe()} over a dimension other than the channels")
        return None
    return chans


def _affine(op: Op, weight_at: int, bias_at: int) -> tuple[str | None, str | None] | None:
    """The parameter names of a functional norm's ``weight`` and ``bias`` (None where absent); None if computed."""
    weight, bias = call_arg(op, weight_at, "weight"), call_arg(op, bias_at, "bias")
    names = param_name(weight), param_name(bias)
    if (weight is not None and names[0] is None) or (bias is not None and names[1] is None):
        return None
    return names


_NO_WEIGHT = "it has no weight (γ), so a zero channel becomes −μ/σ, not 0: its channels are kept"
_NO_RMS_WEIGHT = "it has no weight (γ) to take the rescaling by sqrt(C/C') that cutting channels needs"


# -- LayerNorm ------------------------------------------------------------------------------------

def layer_norm(op: Op) -> None:
    """``nn.LayerNorm(C)`` over the last dim (and subclasses called as leaves, e.g. timm's ``LayerNorm``)."""
    mod = op.module
    if (chans := _along(op, op.channels(op.input), -1)) is None:
        return
    if len(mod.normalized_shape) != 1:
        op.unknown(f"{op.describe()} over several dimensions")
    elif mod.weight is None:
        _pin(op, chans, _NO_WEIGHT)
    else:
        w, b = op.param("weight"), op.param("bias") if mod.bias is not None else None
        _normalize(op, chans, w, b, NormSite(op.path, "layer", w, b, mod.eps, -1))


def layer_norm_2d(op: Op) -> None:
    """A module named ``LayerNorm2d`` called as a leaf (timm's): a LayerNorm over the channels of ``(B, C, H, W)``."""
    mod = op.module
    if (chans := _along(op, op.channels(op.input), 1)) is None:
        return
    if getattr(mod, "weight", None) is None:
        _pin(op, chans, _NO_WEIGHT)
    else:
        w, b = op.param("weight"), op.param("bias") if getattr(mod, "bias", None) is not None else None
        _normalize(op, chans, w, b, NormSite(op.path, "layer", w, b, float(mod.eps), 1))


def layer_norm_fn(op: Op) -> None:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last dim, on a module's parameters.

    Exact only where the call is its module's whole forward (timm's ``LayerNorm``, ``LayerNorm2d`` with
    its two permutes, nanoGPT's ``LayerNorm``): compaction swaps that module for a ``PaddedLayerNorm``.
    """
    if (chans := _along(op, op.channels(op.input), -1)) is None:
        return
    names, eps, shape = _affine(op, 2, 3), call_arg(op, 4, "eps", 1e-5), call_arg(op, 1, "normalized_shape")
    if names is None or not isinstance(eps, (int, float)) or (isinstance(shape, (tuple, list)) and len(shape) != 1):
        op.unknown("layer_norm with computed affine terms or over several dimensions")
        return
    (w, b), dim = names, _module_dim(op, *names)
    if w is None:
        _pin(op, chans, _NO_WEIGHT)
    elif dim is None:
        _pin(op, chans, "F.layer_norm is one step of a larger forward, so compaction cannot swap its module for a "
                        "PaddedLayerNorm (which keeps the cut channels' share of μ and σ); call an nn.LayerNorm")
    else:
        _normalize(op, chans, w, b, NormSite(op.path, "layer", w, b, float(eps), dim))


def padded_layer_norm_fn(op: Op) -> None:
    """A :class:`~torchslim.layers.PaddedLayerNorm` (a compacted LayerNorm): it stays exact when more zeros go."""
    dim = call_arg(op, 5, "dim", -1)
    names = _affine(op, 2, 3)
    if (chans := _along(op, op.channels(op.input), dim)) is None:
        return
    if names is None or names[0] is None:
        op.unknown("padded_layer_norm with computed affine terms")
        return
    _normalize(op, chans, *names, None)  # its statistics count `full` channels whatever is cut: nothing to fix


def _module_dim(op: Op, weight: str | None, bias: str | None) -> int | None:
    """The dim of its module's input that the norm call ``op`` normalizes, if the call is the module's whole
    forward on its own ``weight``/``bias``: ``-1`` (``norm(x)``) or ``1`` (``norm(x.permute(0, 2, 3, 1))``
    permuted back, as timm's ``LayerNorm2d``); None otherwise (the module cannot be swapped)."""
    path, node = op.path, op.node
    if not path or weight not in (None, f"{path}.weight") or bias not in (None, f"{path}.bias"):
        return None
    inp, users = node.args[0], list(node.users)
    mine = module_ops(op.walk.gm.graph, path)
    if not _inside(inp, path):
        dim, steps = -1, {node}
    elif _is_permute(inp, (0, 2, 3, 1)) and not _inside(inp.args[0], path) and len(users) == 1 \
            and _is_permute(users[0], (0, 3, 1, 2)):
        dim, steps, users = 1, {inp, node, users[0]}, list(users[0].users)
    else:
        return None
    return dim if mine == steps and not any(_inside(u, path) for u in users) else None


def _inside(node: Any, path: str) -> bool:
    return isinstance(node, fx.Node) and module_path(node) == path


def _is_permute(node: Any, order: tuple[int, ...]) -> bool:
    if not isinstance(node, fx.Node) or node.target not in ("permute", torch.permute, torch.ops.aten.permute.default):
        return False
    dims = node.args[1:] if node.op == "call_method" else node.args[1:2]
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)
    return dims == order


# -- RMSNorm --------------------------------------------------------------------------------------

def rms_norm(op: Op) -> None:
    """``nn.RMSNorm(C)`` over the last dim: exact over the kept channels with γ·sqrt(C/C') and ε·C/C'."""
    mod = op.module
    if (chans := _along(op, op.channels(op.input), -1)) is None:
        return
    if len(mod.normalized_shape) != 1:
        op.unknown(f"{op.describe()} over several dimensions")
    elif mod.weight is None:
        _pin(op, chans, _NO_RMS_WEIGHT)
    else:
        w = op.param("weight")
        _normalize(op, chans, w, None, NormSite(op.path, "rms", w, eps=mod.eps, eps_attr="eps"))


def hf_rms_norm(op: Op) -> None:
    """A Hugging Face RMSNorm module (``weight``, ``variance_epsilon``) called as a leaf: as ``nn.RMSNorm``."""
    mod = op.module
    if (chans := _along(op, op.channels(op.input), -1)) is None:
        return
    if not isinstance(getattr(mod, "weight", None), nn.Parameter) or not hasattr(mod, "variance_epsilon"):
        op.unknown(f"{op.describe()} without weight and variance_epsilon")
        return
    w = op.param("weight")
    _normalize(op, chans, w, None, NormSite(op.path, "rms", w, eps=float(mod.variance_epsilon),
                                            eps_attr="variance_epsilon"))


def rms_norm_fn(op: Op) -> None:
    """``F.rms_norm(x, (C,), weight, eps)`` as its module's whole forward (timm's ``RmsNorm``; a Hugging Face
    RMSNorm under :func:`functional_norms`): the module is rescaled in place, or swapped for an ``nn.RMSNorm``."""
    if (chans := _along(op, op.channels(op.input), -1)) is None:
        return
    weight, eps, shape = call_arg(op, 2, "weight"), call_arg(op, 3, "eps"), call_arg(op, 1, "normalized_shape")
    w = param_name(weight)
    if (weight is not None and w is None) or not (eps is None or isinstance(eps, (int, float))) \
            or (isinstance(shape, (tuple, list)) and len(shape) != 1):
        op.unknown("rms_norm with a computed weight or over several dimensions")
        return
    if w is None:
        _pin(op, chans, _NO_RMS_WEIGHT)
    elif _module_dim(op, w, None) != -1:
        _pin(op, chans, "F.rms_norm is one step of a larger forward, so compaction cannot rescale its ε; "
                        "call an nn.RMSNorm")
    else:
        _normalize(op, chans, w, None, NormSite(op.path, "rms", w, eps=None if eps is None else float(eps)))


# -- GroupNorm ------------------------------------------------------------------------------------

def group_norm(op: Op) -> None:
    """``nn.GroupNorm(G, C)``: members are whole groups (``G == C``: single channels)."""
    mod = op.module
    w = op.param("weight") if mod.weight is not None else None
    b = op.param("bias") if mod.bias is not None else None
    _grouped(op, mod.num_groups, w, b)


def group_norm_fn(op: Op) -> None:
    """``F.group_norm(x, G, weight, bias, eps)`` inside an ``nn.GroupNorm`` subclass (timm's ``GroupNorm``,
    ``GroupNormAct``) on its own parameters: compaction lowers that module's ``num_groups``."""
    names, groups = _affine(op, 2, 3), call_arg(op, 1, "num_groups")
    if op.channels(op.input) is None:
        return
    if names is None or not isinstance(groups, int):
        op.unknown("group_norm with computed groups or affine terms")
        return
    owner = _owner_class(op)
    if not (isinstance(owner, type) and issubclass(owner, nn.GroupNorm) and names[0] in (None, f"{op.path}.weight")):
        _pin(op, op.channels(op.input), "F.group_norm outside an nn.GroupNorm: compaction could not lower its "
                                        "number of groups")
        return
    _grouped(op, groups, *names)


def _grouped(op: Op, groups: int, weight: str | None, bias: str | None) -> None:
    """Whole groups go together: the class of the channels is coarsened to ``groups`` blocks."""
    if (chans := _along(op, op.channels(op.input), 1)) is None:
        return
    graph = op.walk.graph
    seg = chans.segs[0] if len(chans.segs) == 1 else None
    whole = seg is not None and (seg.width, seg.stride, seg.offset, seg.lo) == (1, 1, 0, 0) \
        and seg.hi == graph.spaces[seg.space].size  # one layer's channels, all of them, in order
    if weight is None:
        _pin(op, chans, "a GroupNorm without weight: compaction could not tell how many groups are left")
    elif groups == 1:
        _pin(op, chans, "a GroupNorm with one group normalizes all channels together")
    elif not whole:
        _pin(op, chans, f"its {groups} groups span channels of several layers, so they cannot be cut whole")
    else:
        graph.union(seg.space, seg.space, groups=groups)  # a member is C/G' channels, G' | G: whole groups
        for name in (weight, bias):
            if name is not None:
                op.attach(chans, name, 0, "out")
        graph.norms[op.path] = NormSite(op.path, "group", weight, bias)
        op.output(chans)  # a zero group comes out as β: silent when β is zero too


def _owner_class(op: Op) -> type | None:
    """The class of the module the operation sits in, from ``nn_module_stack`` (torch.export gives its qualified
    name: looked up among the loaded modules, nothing is imported), or None."""
    stack = op.node.meta.get("nn_module_stack")
    cls = next(reversed(stack.values()))[1] if stack else None
    if isinstance(cls, str):
        module, _, name = cls.rpartition(".")
        cls = getattr(sys.modules.get(module), name, None)
    return cls if isinstance(cls, type) else None


RULES: dict[Any, OpRule] = {
    nn.LayerNorm: layer_norm, "LayerNorm2d": layer_norm_2d, F.layer_norm: layer_norm_fn,
    padded_layer_norm: padded_layer_norm_fn,
    nn.RMSNorm: rms_norm, F.rms_norm: rms_norm_fn, **dict.fromkeys(HF_RMS_NORMS, hf_rms_norm),
    nn.GroupNorm: group_norm, F.group_norm: group_norm_fn,
}


# -- capture ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def functional_norms(model: nn.Module) -> Iterator[None]:
    """While capturing ``model``: Hugging Face-style RMSNorm modules run as one ``F.rms_norm`` call.

    Their forward is written out in Python (``pow``, ``mean``, ``rsqrt``, ``mul``), which the tracer would see
    as a mean over the channels. A module whose class name ends in ``RMSNorm`` with a 1-d ``weight`` and a
    ``variance_epsilon``, and whose forward agrees with ``F.rms_norm`` on a random probe (Gemma's ``1 + weight``
    does not), gets an instance ``forward`` computing ``F.rms_norm(x, (C,), weight, variance_epsilon)``; the
    captured graph then holds one ``rms_norm`` op on the weight parameter. Every forward is restored on exit,
    also on error.
    """
    patched: list[tuple[nn.Module, Callable[..., Any] | None]] = []
    try:
        for mod in model.modules():
            if _rms_like(mod):
                patched.append((mod, mod.__dict__.get("forward")))
                mod.forward = types.MethodType(_as_rms_norm(mod.weight.shape[0]), mod)
        yield
    finally:
        for mod, own in reversed(patched):
            if own is None:
                del mod.forward
            else:
                mod.forward = own


def _as_rms_norm(size: int) -> Callable[..., Any]:
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (size,), self.weight, self.variance_epsilon)
    return forward


@torch.no_grad()
def _rms_like(mod: nn.Module) -> bool:
    """Whether ``mod`` is a Hugging Face-style RMSNorm that ``F.rms_norm`` computes (checked on a probe)."""
    w = getattr(mod, "weight", None)
    if not type(mod).__name__.endswith("RMSNorm") or not isinstance(w, nn.Parameter) or w.dim() != 1 \
            or not isinstance(getattr(mod, "variance_epsilon", None), (int, float)):
        return False
    if w.is_meta:
        return True
    probe = torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w)
    want = F.rms_norm(probe, (w.shape[0],), w, mod.variance_epsilon)
    try:
        got = type(mod).forward(mod, probe)
    except Exception:  # noqa: BLE001 - a forward with other arguments is not the one we mean
        return False
    tol = 1e-5 if w.dtype == torch.float32 else 2e-2
    return isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=tol, atol=tol)
