"""Normalization layers after their channels were cut: exact over the kept channels.

Compaction cuts only *silent* channels out of a norm (exactly zero at its input, γ and β zero: see
:mod:`torchslim.structure.norm_rules`), so with ``C`` channels before and ``C'`` kept:

* RMSNorm: ``rms_C(x) = sqrt(Σ_k x_k²/C + ε)``; the cut channels add nothing to the sum ``S``, so
  ``sqrt(S/C + ε) = sqrt(C'/C)·sqrt(S/C' + ε·C/C') = sqrt(C'/C)·rms'_{C'}(x)`` with ``ε' = ε·C/C'``, and
  ``y_k = γ_k·x_k/rms_C = (γ_k·sqrt(C/C'))·x_k/rms'_{C'}``: a standard RMSNorm over ``C'`` with weight
  ``γ·sqrt(C/C')`` and epsilon ``ε·C/C'`` is exact (:func:`rms_rescale`). The module keeps its class.
* LayerNorm: μ and σ² need the cut channels' share (``μ = S/C``, and each zero adds ``μ²`` to the
  variance), which no standard LayerNorm over ``C'`` expresses: the module becomes a
  :class:`~torchslim.layers.PaddedLayerNorm` (``kept=C'``, ``full=C``).
* GroupNorm: whole groups were cut, the others' statistics are unchanged: ``num_groups`` shrinks.
* A weight-standardized conv whose zero input columns were cut standardizes each filter over fewer entries,
  which changes μ and σ as for LayerNorm: the module becomes a :class:`~torchslim.layers.PaddedStdConv`
  over the original fan-in.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn

from torchslim.layers import PaddedLayerNorm, PaddedStdConv
from torchslim.structure.graph import NormSite, StdConvSite


def rms_rescale(weight: Tensor, eps: float, full: int, kept: int) -> tuple[Tensor, float]:
    """``(γ·sqrt(C/C'), ε·C/C')``: an RMSNorm over the ``C' = kept`` channels left of ``C = full``, exact where
    the cut ones were zero (derivation in the module docstring). ``weight``: γ ``(C',)``, already cut."""
    return weight * math.sqrt(full / kept), eps * full / kept


def sync_norms(model: nn.Module, before: Mapping[str, tuple[int, ...]],
               sites: Mapping[str, NormSite | StdConvSite]) -> None:
    """Make every norm in ``sites`` whose channels were cut exact over the kept ones, in place.

    Args:
        model: the model after the cut.
        before: ``{parameter or buffer name: shape}`` before the cut: γ's first dim is ``C``.
        sites: the norms the tracer recorded, by module path (``graph.norms``).
    """
    for site in sites.values():
        if isinstance(site, StdConvSite):
            _pad_std_conv(model, before, site)
            continue
        weight = _get(model, site.weight)
        full, kept = before[site.weight][0], weight.shape[0]
        if kept == full:
            continue
        mod = model.get_submodule(site.module)
        if site.kind == "rms":
            _rescale_rms(model, site, mod, weight, full, kept)
        elif site.kind == "layer" and not isinstance(mod, PaddedLayerNorm):  # a PaddedLayerNorm stays exact
            bias = _get(model, site.bias) if site.bias is not None else None
            _replace(model, site.module, _padded(weight, bias, full, site))
        elif site.kind == "group":
            mod.num_groups = kept * mod.num_groups // full  # C/G channels per group, whole groups cut
            mod.num_channels = kept


def _rescale_rms(model: nn.Module, site: NormSite, mod: nn.Module, weight: Tensor, full: int, kept: int) -> None:
    """γ·sqrt(C/C') and ε·C/C' in the module (its ``eps`` or ``variance_epsilon``), or an ``nn.RMSNorm``."""
    attr = site.eps_attr or next((a for a in ("variance_epsilon", "eps") if _holds_eps(mod, a, site.eps)), None)
    eps = site.eps if site.eps is not None else torch.finfo(weight.dtype).eps  # F.rms_norm's default
    new_weight, new_eps = rms_rescale(weight.detach(), eps, full, kept)
    with torch.no_grad():
        weight.copy_(new_weight)
    if attr is None:  # a module whose whole forward was F.rms_norm on its weight, with ε from elsewhere
        norm = nn.RMSNorm(kept, eps=new_eps, device=weight.device, dtype=weight.dtype)
        norm.weight = weight
        _replace(model, site.module, norm)
        return
    setattr(mod, attr, new_eps)
    if isinstance(getattr(mod, "normalized_shape", None), tuple):  # nn.RMSNorm, timm's RmsNorm
        mod.normalized_shape = (kept,)


def _pad_std_conv(model: nn.Module, before: Mapping[str, tuple[int, ...]], site: StdConvSite) -> None:
    """A standardized conv whose input columns were cut becomes a ``PaddedStdConv`` over its original fan-in."""
    weight = _get(model, site.weight)
    full = math.prod(before[site.weight][1:])
    if weight[0].numel() == full or isinstance(model.get_submodule(site.module), PaddedStdConv):
        return
    bias, gain = (_get(model, n) if n is not None else None for n in (site.bias, site.gain))
    _replace(model, site.module, PaddedStdConv(weight, bias, gain, site.scale, site.eps, full, site.stride,
                                               site.padding, site.dilation))


def _holds_eps(mod: nn.Module, attr: str, eps: float | None) -> bool:
    if attr == "variance_epsilon":
        return hasattr(mod, attr)
    return hasattr(mod, attr) and getattr(mod, attr) == eps


def _padded(weight: Tensor, bias: Tensor | None, full: int, site: NormSite) -> PaddedLayerNorm:
    """A :class:`PaddedLayerNorm` holding the cut γ, β (the same Parameters)."""
    norm = PaddedLayerNorm(weight.shape[0], full, site.eps, bias=bias is not None, dim=site.dim)
    norm.weight = weight
    if bias is not None:
        norm.bias = bias
    return norm


def _get(model: nn.Module, name: str) -> Tensor:
    owner, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
