"""Low-rank decomposition after Force Regularization (Wen et al., ICCV 2017): one layer becomes two.

A layer's weight, as the matrix ``W (N × d)`` with ``d = C/g·kh·kw`` (one block per group ``g``), is
factored as ``W ≈ P·B`` with ``B (r × d)`` the *basis filters* and ``P (N × r)`` their combinations. The
layer becomes :class:`LowRank`: ``B`` as a conv with the layer's kernel, stride, padding and dilation and
``r`` filters per group (no bias), then ``P`` as a 1×1 conv holding the bias; a Linear becomes two
Linears. That costs ``r·(d + N/g)`` instead of ``N/g·d`` multiply-adds per group and output position.

The intermediate ``r`` channels are the layer's *ranks*: ``structures(model, x, kinds=("rank",))``
returns them as groups, so group Lasso can remove ranks while fine-tuning and :func:`compact` cuts
the zero ones (grouped layers have no rank groups: there the ranks couple with the input channels).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from torchslim._deprecate import renamed_kwargs
from torchslim._inputs import as_tuple, first_inputs
from torchslim._select import check_patterns, selected
from torchslim.errors import ConfigError
from torchslim.layers import LowRank
from torchslim.macs import count_macs

log = logging.getLogger(__name__)

Method = Literal["pca", "svd"]
_TIE = 1e-9  # energy=1.0 must accept a cumulative fraction that rounds to 1 - 1e-16


@dataclass(frozen=True)
class LowRankLayer:
    """What :func:`lowrank` did with one layer. ``rank`` is the ``r`` the energy (or ``ranks``) asks for,
    also when the layer was left alone for saving nothing (``decomposed`` False, ``note`` says why);
    None when no rank was computed (skipped, or no rank given)."""

    name: str
    kind: Literal["conv", "linear"]
    out: int                    # N: filters or output features
    fan_in: int                 # d = C/g·kh·kw per filter
    groups: int
    rank: int | None            # r per group
    energy: float | None        # fraction kept at r (the method's measure), the smallest over groups
    error: float | None         # ||y − ŷ|| / ||y|| of this layer on its input from example_inputs
    macs_before: int | None     # per sample, this layer's first call on example_inputs
    macs_after: int | None
    note: str = ""
    decomposed: bool = False    # the layer was replaced by a LowRank pair


@dataclass(frozen=True)
class LowRankResult:
    """The decomposed copy and one row per candidate layer, in model order."""

    model: nn.Module
    layers: tuple[LowRankLayer, ...]

    def format(self) -> str:
        """A plain-text table: rank, energy kept, output error and MACs before/after per layer."""
        head = ("layer", "kind", "N", "d", "rank", "energy", "error", "MACs before", "MACs after", "note")
        rows = [head] + [(r.name, r.kind, str(r.out), str(r.fan_in), _fmt(r.rank), _fmt(r.energy, ".4f"),
                          _fmt(r.error, ".3g"), _fmt(r.macs_before), _fmt(r.macs_after), r.note)
                         for r in self.layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) if i in (0, 1, 9) else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows)


def _fmt(v: float | int | None, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


# -- the decompositions: pure functions of one weight block ------------------------------------

@dataclass(frozen=True)
class _Split:
    """``W (n × d) = second @ first`` with components by decreasing energy; ``k = min(n, d)``."""

    first: Tensor    # (k, d) basis filters
    second: Tensor   # (n, k) combinations
    energy: Tensor   # (k,) fraction kept by the first 1, 2, ..., k components (non-decreasing, last 1)


def _fraction(x: Tensor) -> Tensor:
    total = x.sum()
    return x.cumsum(0) / total if total > 0 else torch.ones_like(x)


def _pca(w: Tensor) -> _Split:
    """Uncentered PCA of the filters, as the original ``nn_decomposer.py``.

    ``X = Wᵀ (d × n)``; eigenvectors ``V`` of ``XᵀX`` by eigenvalue ``λ`` descending; ``B = (X·V_r)ᵀ``,
    ``P = V_r``, so ``W ≈ V_r·V_rᵀ·W``. Energy: ``Σ_{i≤r} λ_i / Σ λ`` (``λ_i = σ_i²``).
    """
    lam, v = torch.linalg.eigh(w @ w.T)                    # (n,), (n, n), ascending
    k = min(w.shape)
    lam, v = lam.flip(0)[:k].clamp_min(0), v.flip(1)[:, :k]
    return _Split(v.T @ w, v, _fraction(lam))


def _svd(w: Tensor) -> _Split:
    """``W = U·S·Vᵀ`` with ``√S`` on both factors; energy ``√(Σ_{i≤r} σ_i² / Σ σ²)``, as the original."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)   # (n, k), (k,), (k, d)
    root = s.sqrt()
    return _Split(root[:, None] * vh, u * root, _fraction(s * s).sqrt())


def _blocks(layer: nn.Conv2d | nn.Linear) -> list[Tensor]:
    """One float64 ``(N/g, d)`` matrix per group."""
    g = layer.groups if isinstance(layer, nn.Conv2d) else 1
    w = layer.weight.detach().to(torch.float64).flatten(1)  # (N, d)
    return list(w.chunk(g, 0))


def _rank_for(splits: Sequence[_Split], energy: float) -> int:
    """The smallest ``r`` that keeps ``energy`` in every group."""
    return max(int((s.energy < energy * (1 - _TIE)).sum()) + 1 for s in splits)


def _decomposed(layer: nn.Conv2d | nn.Linear, splits: Sequence[_Split], r: int) -> LowRank:
    """``layer`` as ``LowRank(first, second)`` from the top ``r`` components of each group."""
    w, bias = layer.weight, layer.bias
    kw = {"device": w.device, "dtype": w.dtype}
    first_w = torch.cat([s.first[:r] for s in splits])                  # (g·r, d)
    second_w = torch.cat([s.second[:, :r] for s in splits])             # (N, r)
    if isinstance(layer, nn.Linear):
        first = nn.Linear(layer.in_features, r, bias=False, **kw)
        second = nn.Linear(r, layer.out_features, bias=bias is not None, **kw)
    else:
        g = layer.groups
        first = nn.Conv2d(layer.in_channels, g * r, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, g, bias=False, padding_mode=layer.padding_mode, **kw)
        second = nn.Conv2d(g * r, layer.out_channels, 1, groups=g, bias=bias is not None, **kw)
    with torch.no_grad():
        first.weight.copy_(first_w.view(first.weight.shape))             # (g·r, C/g, kh, kw)
        second.weight.copy_(second_w.view(second.weight.shape))          # (N, r, 1, 1)
        if bias is not None:
            second.bias.copy_(bias)
    return LowRank(first, second).train(layer.training)


# -- choosing layers and ranks -------------------------------------------------------------------

def _candidates(model: nn.Module, include: Sequence[str] | None) -> dict[str, nn.Conv2d | nn.Linear]:
    """Exact ``Conv2d``/``Linear`` layers with more than one output, outside any :class:`LowRank`, in ``include``."""
    inside = {n for n, m in model.named_modules() if isinstance(m, LowRank)}
    found = {n: m for n, m in model.named_modules()
             if type(m) in (nn.Conv2d, nn.Linear) and m.weight.shape[0] > 1
             and not any(n.startswith(p + ".") for p in inside)}
    check_patterns(include, list(found), "include")
    found = {n: m for n, m in found.items() if selected(n, include)}
    if not found:
        raise ConfigError(
            f"{type(model).__name__} has no layer to decompose: lowrank() factors nn.Conv2d and nn.Linear "
            "layers with more than one output" + (f" among include={list(include)}" if include is not None else "")
        )
    return found


def _check_ranks(ranks: Mapping[str, int], found: Mapping[str, nn.Module], exclude: Sequence[str]) -> None:
    """``ranks`` names candidate layers exactly, none of them excluded."""
    for key in ranks:
        if key not in found:
            close = difflib.get_close_matches(key, list(found), n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"ranks names '{key}', which is no decomposable layer{hint}; "
                              f"layers: {', '.join(found)}")
    clash = [n for n in ranks if not selected(n, None, exclude)]
    if clash:
        raise ConfigError(f"layers {clash} are both in ranks and excluded; drop them from one")


def _check_args(energy: float | None, ranks: Mapping[str, int], method: str) -> None:
    if method not in ("pca", "svd"):
        raise ConfigError(f"method must be 'pca' (the original tool's default) or 'svd', got {method!r}")
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))
                               or not 0 < energy <= 1):
        raise ConfigError(f"energy must be a fraction in (0, 1], e.g. 0.95 (the paper's), got {energy!r}")
    for name, r in ranks.items():
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ConfigError(f"ranks['{name}'] must be an integer >= 1, got {r!r}")


def _choose(name: str, splits: Sequence[_Split], energy: float | None, ranks: Mapping[str, int],
            require_saving: bool) -> tuple[int | None, str]:
    """``(r, "")`` to decompose at ``r``, or ``(r, why the layer stays)``."""
    n, d = splits[0].second.shape[0], splits[0].first.shape[1]
    if name in ranks:
        r = ranks[name]
        if r > min(n, d):
            raise ConfigError(f"ranks['{name}'] = {r} exceeds min(N/g, d) = min({n}, {d})")
    else:
        r = _rank_for(splits, energy)
    useful = (n * d - 1) // (d + n)  # the largest r with r·(d + n) < n·d
    if require_saving and r > useful:
        if name in ranks:
            raise ConfigError(f"ranks['{name}'] = {r} saves no multiply-adds (r·(d + N/g) >= N/g·d with d = {d}, "
                              f"N/g = {n}); give a rank <= {useful} or pass require_saving=False")
        return r, f"no saving at r={r} (needs r <= {useful})"
    return r, ""


# -- the transform -------------------------------------------------------------------------------

@renamed_kwargs(layers="include", skip="exclude")
def lowrank(
    model: nn.Module,
    example_inputs: Tensor | Sequence[Tensor] | None = None,
    *,
    energy: float | None = None,
    ranks: Mapping[str, int] | None = None,
    method: Method = "pca",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    require_saving: bool = True,
) -> LowRankResult:
    """Replace layers of a copy of ``model`` by :class:`LowRank` pairs (Force Regularization's step 2).

    Candidates are all exact ``nn.Conv2d`` and ``nn.Linear`` layers with more than one output (not
    already inside a ``LowRank``); grouped convs are factored per group with one ``r`` for all groups
    (the largest any group needs). A layer stays as it is when ``r·(d + N/g) >= N/g·d``: no saving.

    Args:
        model: not modified; the result is a deep copy.
        example_inputs: a batch the model accepts; with it each row reports the layer's relative output
            error and its MACs before and after (per sample), measured on the layer's input.
        energy: keep the smallest ``r`` whose energy fraction is ``>= energy`` (PCA: eigenvalue sum
            ``Σλ_{≤r}/Σλ``; SVD: ``√(Σσ²_{≤r}/Σσ²)``). Default 0.95 (the paper's) without ``ranks``.
        ranks: explicit ``r`` per layer name, e.g. ``{"conv2": 8}``; other layers use ``energy``, or stay
            when only ``ranks`` is given.
        method: ``"pca"`` (uncentered, the original tool's default) or ``"svd"``; at the same ``r`` both
            give the same function, they differ in how ``r`` follows from ``energy``.
        include: only these layers, as names, prefixes ending at ``.`` or globs (``"layer2"``,
            ``"*.conv2"``); ``None`` is all candidates. (Formerly ``layers=``, which still works for one release.)
        exclude: layers to leave alone, by the same rule, e.g. ``"layer2.0.shortcut"``; their rows say
            ``"skipped"``. (Formerly ``skip=``.)
        require_saving: ``False`` decomposes even where the rank saves nothing (e.g. full rank, to let
            group Lasso on the ``rank`` groups choose the ranks while fine-tuning).
    Returns:
        :class:`LowRankResult` with the new model (same training mode) and one row per candidate.
    Raises:
        ConfigError: no candidate layer; a bad ``method`` or ``energy``; a rank < 1, > ``min(N/g, d)`` or
            without saving; a name in ``ranks``, or a pattern in ``include`` or ``exclude``, that matches no candidate.

    Example:
        >>> import torch
        >>> from torchslim import lowrank
        >>> net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        >>> result = lowrank(net, torch.randn(4, 64), ranks={"0": 4})
        >>> result.model[0].rank, result.layers[0].macs_after
        (4, 384)
    """
    ranks = dict(ranks or {})
    energy = 0.95 if energy is None and not ranks else energy
    _check_args(energy, ranks, method)
    found = _candidates(model, include)
    check_patterns(exclude, list(found), "exclude")
    _check_ranks(ranks, found, exclude)
    new = copy.deepcopy(model)
    rows, replacements = [], {}
    for name in found:
        layer = new.get_submodule(name)
        row = _row(name, layer)
        skipped = not selected(name, None, exclude)
        if skipped or (name not in ranks and energy is None):
            rows.append(dataclasses.replace(row, note="skipped" if skipped else "no rank given"))
            continue
        splits = [(_pca if method == "pca" else _svd)(w) for w in _blocks(layer)]
        r, note = _choose(name, splits, energy, ranks, require_saving)
        if not note:
            replacements[id(layer)] = _decomposed(layer, splits, r)
        rows.append(dataclasses.replace(row, rank=r, note=note, decomposed=not note,
                                        energy=min(float(s.energy[r - 1]) for s in splits)))
    _replace(new, replacements)
    if example_inputs is not None:
        rows = _measure(model, new, example_inputs, rows)
    log.info("lowrank (%s): %s", method, {r.name: r.rank if r.decomposed else r.note for r in rows})
    return LowRankResult(new, tuple(rows))


def _row(name: str, layer: nn.Conv2d | nn.Linear) -> LowRankLayer:
    """The layer's row before any choice: kept, nothing measured."""
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    return LowRankLayer(name, kind, layer.weight.shape[0], layer.weight[0].numel(), getattr(layer, "groups", 1),
                        rank=None, energy=None, error=None, macs_before=None, macs_after=None)


def _replace(model: nn.Module, by_id: Mapping[int, nn.Module]) -> None:
    """Put each replacement wherever its layer is a child (a shared layer: at all its places)."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if id(child) in by_id:
                setattr(parent, attr, by_id[id(child)])


@torch.no_grad()
def _measure(model: nn.Module, new: nn.Module, inputs: Tensor | Sequence[Tensor],
             rows: list[LowRankLayer]) -> list[LowRankLayer]:
    """Each row with its layer's output error and MACs, on the layer's first input in ``model``."""
    seen = first_inputs(model, as_tuple(inputs), [r.name for r in rows])
    out = []
    for row in rows:
        x = seen.get(row.name)
        if x is None:  # never called on these inputs
            out.append(row)
            continue
        before, after = model.get_submodule(row.name), new.get_submodule(row.name)
        y, y_hat = before(x), after(x)
        error = float((y - y_hat).norm() / y.norm()) if y.norm() > 0 else float((y - y_hat).norm())
        macs = [count_macs(m, x) for m in (before, after)]
        out.append(dataclasses.replace(row, error=error, macs_before=macs[0], macs_after=macs[1]))
    return out
