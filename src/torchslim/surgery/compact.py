"""Cut learned zeros out: a physically smaller model of standard layers that computes the same function."""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Collection, Literal, Sequence

import torch
from torch import Tensor, nn

from torchslim._inputs import Inputs, as_tuple, first_inputs
from torchslim.errors import (
    ConfigError,
    NondeterministicModel,
    TorchSlimError,
    UnknownOpWarning,
    UnsupportedOperation,
    VerificationError,
)
from torchslim.layers import LoweredConv2d
from torchslim.structure.capture import Capture
from torchslim.structure.depth import remove_branches, residual_branches
from torchslim.structure.graph import _DependencyGraph
from torchslim.structure.groups import Family
from torchslim.structure.tracing import channel_graph, coupled_families, warn_pinned
from torchslim.surgery.heads import sync_attention
from torchslim.surgery.norms import sync_norms
from torchslim.surgery.ties import Plan, keep_for_ties
from torchslim.surgery.verify import VerifyReport, check_finite, verify

__all__ = ["Shapes", "VerifyReport", "compact", "verify"]  # verify lives in surgery.verify; re-exported here

log = logging.getLogger(__name__)

Shapes = Literal["off", "crop", "lowered", "auto"]


# -- channel removal ---------------------------------------------------------------------------

def _live_members(fam: Family, multiple: int = 1) -> Tensor:
    """Members that must stay: not unread (consumers zero) and not silent (producers zero).

    A member a norm reads (``fam.read_by_norm``) is read by the norm's statistics even where every
    consumer's columns are zero, so only silence removes it.

    With ``multiple > 1`` the count is rounded up to a multiple (capped at ``fam.size``) by also keeping
    the largest of the removable members: kept as they are, they change nothing. Not for ``"head"``
    families: a member is a head of ``D`` channels, whose widths are multiples of ``D`` already.
    """
    if fam.kind == "head":
        multiple = 1
    has_in = any(s.role == "in" for s in fam.stripes)
    unread = fam.row_sq("in") == 0 if has_in else torch.ones(fam.size, dtype=torch.bool)
    if fam.read_by_norm:
        unread = torch.zeros(fam.size, dtype=torch.bool)
    silent = (fam.row_sq("out") == 0) & fam.zero_preserving
    live = torch.nonzero(~(unread.cpu() | silent.cpu())).flatten()
    want = min(fam.size, max(1, -(-len(live) // multiple) * multiple))  # keep one: no 0-width layers
    return _keep_strongest(fam, live, want)


def _keep_strongest(fam: Family, keep: Tensor, count: int) -> Tensor:
    """``keep`` (sorted member indices) plus the largest other members, up to ``count`` in all.

    Keeping a removable member as it is changes nothing, so this only trades size for a shape.
    """
    if count <= len(keep):
        return keep
    spare = fam.row_sq().cpu().index_fill(0, keep, -1.0)
    return torch.sort(torch.cat([keep, spare.topk(count - len(keep)).indices])).values


def _get(model: nn.Module, name: str) -> Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Every (module, attribute) that holds each parameter or buffer, by tensor id (tied weights: several)."""
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in model.modules():
        for key, t in [*mod._parameters.items(), *mod._buffers.items()]:
            if t is not None:
                out.setdefault(id(t), []).append((mod, key))
    return out


def _set(model: nn.Module, name: str, value: Tensor, holders: dict[int, list[tuple[nn.Module, str]]]) -> None:
    """Replace the tensor ``name`` everywhere it is used: tied weights stay tied."""
    old = _get(model, name)
    new = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value
    holders[id(new)] = holders.pop(id(old))         # the same tensor may be cut again along another dim
    for mod, key in holders[id(new)]:
        if isinstance(new, nn.Parameter):
            setattr(mod, key, new)
        else:
            mod._buffers[key] = new


def _uniform(plan: Plan) -> Plan:
    """One hidden size per nn.LSTM/GRU: its layers all keep the largest count, padded with the strongest."""
    need: dict[str, int] = {}
    for fam, keep in plan:
        if fam.uniform is not None:
            need[fam.uniform] = max(need.get(fam.uniform, 0), len(keep))
    return [(fam, _keep_strongest(fam, keep, need[fam.uniform]) if fam.uniform is not None else keep)
            for fam, keep in plan]


def _cut(model: nn.Module, plan: Plan) -> None:
    """Drop the rows of every member not kept, all families at once.

    Several families can share a tensor (a BatchNorm after ``cat``, a consumer of two chunks), so rows
    are marked first and each tensor is cut once: cutting family by family would shift the offsets.
    """
    drop: dict[tuple[str, int], Tensor] = {}
    for fam, keep in plan:
        dead = torch.ones(fam.size, dtype=torch.bool)
        dead[keep] = False
        for s in fam.stripes:
            t = _get(model, s.param)
            mask = drop.setdefault((s.param, s.dim), torch.zeros(t.shape[s.dim], dtype=torch.bool))
            mask[s.member_rows(torch.nonzero(dead).flatten())[0]] = True
    holders = _holders(model)
    for (name, dim), mask in drop.items():
        t = _get(model, name)
        _set(model, name, t.detach().index_select(dim, torch.nonzero(~mask).flatten().to(t.device)).clone(), holders)


def _sync_sizes(model: nn.Module, multipliers: dict[nn.Module, int]) -> None:
    """Make each layer's size attributes agree with its (cut) parameters.

    ``multipliers``: each grouped (or depthwise) conv's output channels per group, from before the cut:
    whole groups are cut, so the new number of groups is ``out_channels / multiplier``.
    A transposed conv's weight is ``(C_in, C_out/groups, k…)``, a conv's ``(C_out, C_in/groups, k…)``.
    """
    for mod in model.modules():
        if isinstance(mod, nn.modules.conv._ConvNd):
            if mod in multipliers:
                mod.groups = mod.weight.shape[0] // multipliers[mod]
            rows, cols = mod.weight.shape[:2]
            if mod.transposed:
                mod.in_channels, mod.out_channels = rows, cols * mod.groups
            else:
                mod.out_channels, mod.in_channels = rows, cols * mod.groups
        elif isinstance(mod, nn.Linear):
            mod.out_features, mod.in_features = mod.weight.shape
        elif isinstance(mod, nn.Embedding):
            mod.num_embeddings, mod.embedding_dim = mod.weight.shape
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):  # transformers' GPT-2 layer: weight (nx, nf)
            mod.nx, mod.nf = mod.weight.shape
        elif isinstance(mod, (nn.LSTM, nn.GRU)):
            mod.hidden_size, mod.input_size = mod.weight_hh_l0.shape[1], mod.weight_ih_l0.shape[1]
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            ref = mod.weight if mod.weight is not None else mod.running_mean
            mod.num_features = ref.shape[0]


def remove_channels(model: nn.Module, inputs: tuple[Tensor, ...], multiple: int = 1,
                    graph: _DependencyGraph | None = None,
                    leaf_modules: Sequence[type[nn.Module]] = (),
                    capture: Capture = "auto", keep_whole: Collection[str] = ()) -> dict[str, tuple[int, int]]:
    """Cut every removable zero channel/neuron from ``model`` in place; ``{label: (before, after)}``.

    ``graph``: ``model``'s channel graph if the caller has traced it already (it is traced otherwise,
    with ``leaf_modules`` and ``capture``). ``keep_whole``: labels of families to leave uncut.
    """
    if graph is None:
        graph, _ = channel_graph(model, inputs, leaf_modules=leaf_modules, capture=capture)
    roots: list[int] = []
    plan = _uniform([(fam, torch.arange(fam.size) if fam.label in keep_whole else _live_members(fam, multiple))
                     for fam in coupled_families(model, graph, roots)])
    plan, renumberings = keep_for_ties(graph, plan, roots)
    for renumbering in renumberings:
        renumbering.apply_()
    plan = [(fam, keep) for fam, keep in plan if len(keep) < fam.size]
    grouped = {m: m.out_channels // m.groups for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups > 1}
    before = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}
    _cut(model, plan)
    _sync_sizes(model, grouped)
    sync_norms(model, before, graph.norms)
    sync_attention(model, before)
    return {fam.label: (fam.size, len(keep)) for fam, keep in plan}


# -- shape-wise: smaller kernels, lowered convolutions -------------------------------------------

def _span(alive: Tensor) -> tuple[int, int]:
    """Zero entries cut from the start and the end of a 1-d boolean ``alive``."""
    ix = torch.nonzero(alive).flatten()
    return int(ix[0]), int(len(alive) - 1 - ix[-1])


def _cropped(conv: nn.Conv2d) -> nn.Module:
    """``conv`` with its all-zero outer kernel rows and columns cut; padding adjusted."""
    w = conv.weight.detach()
    alive = w.abs().sum(0) != 0  # (C, kh, kw): live shape fibers
    (ct, cb), (cl, cr) = _span(alive.any(2).any(0)), _span(alive.any(1).any(0))
    if ct + cb + cl + cr == 0:
        return conv
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel_size, conv.padding, conv.dilation
    pads = (pw - dw * cl, pw - dw * cr, ph - dh * ct, ph - dh * cb)  # (left, right, top, bottom)
    symmetric = pads[0] == pads[1] >= 0 and pads[2] == pads[3] >= 0
    small = nn.Conv2d(
        conv.in_channels, conv.out_channels, (kh - ct - cb, kw - cl - cr), conv.stride,
        padding=(pads[2], pads[0]) if symmetric else 0, dilation=conv.dilation, bias=conv.bias is not None,
    ).to(w.device, w.dtype)  # a float16 model stays float16
    with torch.no_grad():
        small.weight.copy_(w[:, :, ct:kh - cb, cl:kw - cr])
        if conv.bias is not None:
            small.bias.copy_(conv.bias)
    return small if symmetric else nn.Sequential(nn.ZeroPad2d(pads), small)  # negative pad = crop


def _lowered(layer: nn.Module) -> nn.Module | None:
    """The lowered form of a (cropped) conv whose kernels still hold zero fibers, else None."""
    pad, conv = (layer[0], layer[1]) if isinstance(layer, nn.Sequential) else (None, layer)
    columns = torch.nonzero(conv.weight.detach().flatten(1).abs().sum(0)).flatten()
    if len(columns) == conv.weight[0].numel():
        return None
    lowered = LoweredConv2d.from_conv(conv, columns.cpu()).to(conv.weight.dtype)  # float16 stays float16
    return nn.Sequential(pad, lowered) if pad is not None else lowered


def _median_ms(layer: nn.Module, x: Tensor, repeats: int = 15) -> float:
    with torch.inference_mode():
        layer(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def shrink_kernels(model: nn.Module, inputs: tuple[Tensor, ...], shapes: Shapes) -> dict[str, str]:
    """Replace convs with zero shape fibers in place; ``{name: what it became}``."""
    convs = [n for n, m in model.named_modules()
             if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and m.weight.any()]
    samples = first_inputs(model, inputs, convs) if shapes == "auto" else {}
    changes = {}
    for name in convs:
        conv = model.get_submodule(name)
        choice = _cropped(conv)
        if shapes in ("lowered", "auto"):
            lowered = _lowered(choice)
            if lowered is not None and (shapes == "lowered" or name not in samples
                                        or _median_ms(lowered, samples[name]) < _median_ms(choice, samples[name])):
                choice = lowered
        if choice is not conv:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, choice)
            changes[name] = type(choice).__name__ if not isinstance(choice, nn.Sequential) \
                else "+".join(type(m).__name__ for m in choice)
    return changes


def _failing_module(small: nn.Module, inputs: tuple[Tensor, ...]) -> str | None:
    """The innermost module where ``small`` fails to run on ``inputs`` (``""``: its own forward); None if it runs.

    Read from the traceback: the last frame whose ``self`` is one of ``small``'s modules.
    """
    names = {id(m): name for name, m in small.named_modules()}
    try:
        with torch.no_grad():
            small(*inputs)
    except Exception as e:  # noqa: BLE001 - whatever the user's forward raises on the narrower tensors
        where, tb = "", e.__traceback__
        while tb is not None:
            owner = tb.tb_frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                where = names[id(owner)]
            tb = tb.tb_next
        return where
    return None


def _broken(small: nn.Module, where: str, error: Exception) -> VerificationError:
    place = f"module '{where}' ({type(small.get_submodule(where)).__name__})" if where else "the model's own forward"
    return VerificationError(
        f"the compacted model fails in {place}: {error}. An operation there needs the channel counts it "
        "had; please report this model (register_op(target, 'opaque') on that op keeps its channels)")


def _check(model: nn.Module, small: nn.Module, inputs: tuple[Tensor, ...], atol: float
           ) -> tuple[str, Exception] | None:
    """None where ``small`` computes what ``model`` does on ``inputs`` and on seeded random ones; else the
    module where ``small`` fails to run (``""``: its own forward) and the error.

    Raises:
        NondeterministicModel, VerificationError: the outputs differ (the model's own fault, or a bug).
    """
    for probe in (inputs, _fresh(inputs)):
        try:
            report = verify(model, small, probe, atol=atol)
        except TorchSlimError:
            raise
        except Exception as e:  # noqa: BLE001 - a forward that cannot run on the narrower tensors
            where = _failing_module(small, probe)
            if where is None:
                raise
            return where, e
        if not report.ok:
            _check_repeatable(model, probe, atol)
            _refuse_low_precision(model, f"the compacted model differs from the original ({report})")
            raise VerificationError(f"compacted model differs from the original ({report}); please report this model")
    return None


def _refuse_low_precision(model: nn.Module, what: str, cause: Exception | None = None) -> None:
    """A float16/bfloat16 model that fails the check is refused as such: rounding, not a bug to report."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and torch.finfo(p.dtype).bits < 32),
                 None)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        raise UnsupportedOperation(f"{what}: {name} is not supported; convert with model.float(), compact, and "
                                   f"convert the result back with .to(torch.{name})") from cause


_ATTEMPTS = 8  # compactions tried, each keeping whole the families cut inside modules of the class the last one broke


def _alike(small: nn.Module, where: str) -> tuple[str, ...]:
    """Prefixes (``"name."``) of the module ``where`` and of every module of its class; none for the model itself."""
    if not where:
        return ()
    cls = type(small.get_submodule(where))
    return tuple(f"{name}." for name, m in small.named_modules() if name and type(m) is cls)


def compact(
    model: nn.Module,
    example_inputs: Inputs,
    *,
    shapes: Shapes = "crop",
    channel_multiple: int = 1,
    atol: float = 1e-5,
    strict: bool = False,
    leaf_modules: Sequence[type[nn.Module]] = (),
    capture: Capture = "auto",
) -> nn.Module:
    """A physically smaller copy of ``model`` without its all-zero removable structures.

    Replaces every residual block whose branch is all zero (a zero ``depth`` group) by its shortcut,
    removes every zero ``channel``/``neuron`` group (a channel is removed when all the weights that
    read it are zero, or when all that produce it are zero and every operation on its way maps 0 to 0),
    then, by ``shapes``:

    * ``"crop"``: cut all-zero outer kernel rows/columns (a smaller standard ``Conv2d``, padding adjusted);
    * ``"lowered"``: also turn convs with zero shape fibers left into :class:`LoweredConv2d`;
    * ``"auto"``: lowered only where it is measured faster on ``example_inputs``;
    * ``"off"``: channels only.

    ``channel_multiple=8`` (or 16) keeps each layer's width a multiple of 8 by keeping a few removable
    channels (the largest): onnxruntime's blocked convolutions need multiples of 8 and ran 9-17% faster
    on a half-width resnet50 despite the extra multiply-adds (benchmarks/zoo_speed.py); plain PyTorch
    eager gains nothing from it.

    ``strict``, ``leaf_modules`` and ``capture`` trace the model as
    :func:`~torchslim.structure.tracing.structures` does, so pass the same ones: the groups it found are
    the channels compaction can cut.

    The result is checked with :func:`verify` on ``example_inputs`` and on random inputs of the same
    shape, and is returned in eval mode; ``model`` is not changed. Where the smaller model fails to run in
    some module (an operation there needs the width it had, e.g. a reshape to a size computed from another
    tensor's shape), the families cut inside that module are kept whole and compaction starts again, with
    an :class:`UnknownOpWarning` naming them (a few times at most).

    Raises:
        UnsupportedOperation: ``strict=True`` and an operation's channels cannot be followed.
        NondeterministicModel: the model's own outputs differ between two calls on the same input.
        DivergenceError: the model has NaN or infinite weights (its training diverged).
        VerificationError: the smaller model's outputs differ, or it fails to run (the message names
            the module where), e.g. an operation that needs the channel counts it had (a bug; please report it).
    """
    if shapes not in ("off", "crop", "lowered", "auto"):
        raise ConfigError(f"shapes must be one of 'off', 'crop', 'lowered', 'auto', got {shapes!r}")
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise ConfigError(f"channel_multiple must be an integer >= 1, got {channel_multiple!r}")
    check_finite(model)  # NaN weights make every comparison fail: say why, not "please report"
    inputs = as_tuple(example_inputs)
    keep_whole: set[str] = set()
    kept: list[str] = []  # why each family was kept whole, for one warning
    for attempt in range(_ATTEMPTS):
        small = copy.deepcopy(model).eval()
        graph, gm = channel_graph(small, inputs, strict=strict, leaf_modules=leaf_modules, capture=capture)
        if attempt == 0:
            warn_pinned(graph)
        blocks = remove_branches(small, residual_branches(small, gm))
        if blocks:
            log.info("blocks reduced to their shortcut: %s", blocks)
        cuts = remove_channels(small, inputs, channel_multiple, graph=None if blocks else graph,  # re-trace if changed
                               leaf_modules=leaf_modules, capture=capture, keep_whole=keep_whole)
        log.info("removed channels: %s", cuts)
        if shapes != "off":
            log.info("kernels: %s", shrink_kernels(small, inputs, shapes))
        failure = _check(model, small, inputs, atol)
        if failure is None:
            if kept:
                warnings.warn(
                    f"compact kept {len(keep_whole)} group famil{'y' if len(keep_whole) == 1 else 'ies'} whole, as "
                    "cutting them broke a module that needs the "
                    f"width it had (e.g. a reshape to a size computed from another tensor's shape): {'; '.join(kept)}. "
                    "Teach torchslim such a module with register_op to cut them.", UnknownOpWarning, stacklevel=2)
            return small
        where, error = failure
        alike = _alike(small, where)  # the failing module and every other of its class: they fail alike
        families = coupled_families(small, graph)
        if alike:
            params = {f.label: {st.param for st in f.stripes} for f in families}  # names only
            inside = {label for label in cuts if any(p.startswith(alike) for p in params.get(label, ()))}
        else:  # the model's own forward: the width it reshapes to (torchvision's ViT: self.hidden_dim)
            inside = {f.label for f in families if f.kind == "embed" and f.label in cuts}
        if not inside - keep_whole or attempt + 1 == _ATTEMPTS:
            _refuse_low_precision(model, f"the compacted model fails in '{where}': {error}", error)
            raise _broken(small, where, error) from error
        kept.append(f"{', '.join(sorted(inside - keep_whole))} (module '{where}': {str(error).splitlines()[0][:80]})")
        keep_whole |= inside
    raise AssertionError("the loop returns or raises")  # pragma: no cover


def _fresh(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Seeded random inputs like ``inputs``: normal floats; integers (token ids, masks) drawn from the range
    the example spans, so they stay valid ids; booleans kept."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t in inputs:
        if t.is_floating_point():
            out.append(torch.randn(t.shape, generator=gen).to(t))
        elif t.dtype != torch.bool and not t.is_complex() and t.numel():
            lo, hi = int(t.min()), int(t.max())
            out.append(torch.randint(lo, hi + 1, t.shape, generator=gen).to(t))
        else:
            out.append(t)
    return tuple(out)


def _check_repeatable(model: nn.Module, inputs: tuple[Tensor, ...], atol: float) -> None:
    """Raise :class:`NondeterministicModel` if two eval-mode calls of ``model`` on ``inputs`` disagree."""
    report = verify(model, model, inputs, atol=atol)
    if not report.ok:
        raise NondeterministicModel(
            f"the model's outputs differ between two calls on the same input in eval mode ({report}), so no "
            "compacted model can be checked against it. Some operation draws random numbers in eval mode "
            "(e.g. F.dropout(x, training=True), torch.rand in forward, a sampling layer): make forward "
            "deterministic in eval mode (use self.training), then compact again."
        )

