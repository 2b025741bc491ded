"""Group Lasso (SSL, Wen et al. 2016): ``R_g(W) = Σ_g λ_g ||w_g||_2``, as a penalty or a proximal step.

:class:`L1` is the element-wise ``λ·Σ|w|`` beside it, the unstructured baseline of ISS (Wen et al., ICLR 2018).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from torchslim._select import check_patterns, matches
from torchslim.errors import ConfigError
from torchslim.regularize.budget import Cut, LayerBudget, SizeBudget
from torchslim.structure.groups import KINDS, Family, Group, families_of, zero_counts

Mode = Literal["prox", "subgradient"]


@dataclass(eq=False)
class _Block:
    """The groups of one family in the regularizer: member indices, their λ_g, and the size budget's state."""

    family: Family
    members: Tensor  # (G_f,) long
    lam: Tensor  # (G_f,) λ_g, kind strength × layer multiplier × optional sqrt(|g|)
    held: LayerBudget | None = None  # what the budget accumulated for this layer; None: no budget


def _layer(fam: Family) -> str:
    """The layer a family is named by: its producer, the first of them in ``"layer2.0.conv2+2"`` (2 more)."""
    return fam.label.split("+")[0]


def _selects(pattern: str, fam: Family) -> bool:
    """``pattern`` selects ``fam`` when it matches the family's layer (exact, a prefix at ``.``, or a glob), or
    is the whole label (as reports print it)."""
    return pattern == fam.label or matches(pattern, _layer(fam))


def _check_patterns(patterns: Sequence[str] | None, families: Sequence[Family], keyword: str) -> None:
    """:func:`~torchslim._select.check_patterns` over the families' layers; a whole label passes too."""
    labels = {f.label for f in families}
    if patterns is not None and not isinstance(patterns, str):
        patterns = [p for p in patterns if p not in labels]
    check_patterns(patterns, sorted({_layer(f) for f in families}), keyword)


def _multiplier(fam: Family, multipliers: Mapping[str, float]) -> float:
    """Factor on λ for a family: the longest matching key wins, ``"layer:kind"`` before ``"layer"``."""
    best, factor = (-1, -1), 1.0
    for key, m in multipliers.items():
        layer, _, kind = key.partition(":")
        if _selects(layer, fam) and kind in ("", fam.kind) and (len(layer), len(kind)) > best:
            best, factor = (len(layer), len(kind)), float(m)
    return factor


def _check_selection(families: Sequence[Family], multipliers: Mapping[str, float],
                     include: Sequence[str] | None, exclude: Sequence[str]) -> None:
    """Every pattern must select some family: a typo would otherwise silently change nothing.

    Raises:
        ConfigError: naming the pattern and close layer names; a ``"layer:kind"`` key whose layer has no
            group of that kind.
    """
    _check_patterns(include, families, "include")
    _check_patterns(exclude, families, "exclude")
    _check_patterns([key.partition(":")[0] for key in multipliers], families, "multipliers")
    for key in multipliers:
        layer, _, kind = key.partition(":")
        if not any(_selects(layer, f) and kind in ("", f.kind) for f in families):
            kinds = sorted({f.kind for f in families if _selects(layer, f)})
            raise ConfigError(f"multiplier '{key}' selects no group: '{layer}' has groups of kinds {kinds}; "
                              "keys are 'layer' or 'layer:kind'")


def _size_budget(budget: SizeBudget | None, keep: float | Mapping[str, float] | None, keep_ramp: int,
                 keep_cut: Cut, mode: Mode) -> SizeBudget | None:
    """The budget from ``budget=`` or from the ``keep=``/``keep_ramp=``/``keep_cut=`` keywords; None: no budget."""
    if budget is not None and (keep is not None or keep_ramp or keep_cut != "end"):
        raise ConfigError("pass the size budget either as budget=SizeBudget(...) or as keep=, keep_ramp=, keep_cut=, "
                          "not both")
    if budget is None:
        budget = SizeBudget({} if keep is None else keep, keep_ramp, keep_cut)
    if budget and mode != "prox":
        raise ConfigError("keep (a size budget) needs mode='prox', which reaches exact zeros; "
                          "remove keep or use mode='prox'")
    return budget or None


def _number(value: object, what: str) -> float:
    """``value`` as a finite float >= 0: NaN would switch the regularizer off silently, inf zero every group."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _strengths(strength: float | Mapping[str, float]) -> dict[str, float]:
    """λ per kind: one number for every kind, or a mapping (kinds not in it get 0)."""
    if isinstance(strength, Mapping):
        bad = [k for k in strength if k not in KINDS]
        if bad:
            raise ConfigError(f"strength has unknown kinds {bad}; choose from {list(KINDS)}")
        return {k: _number(v, f"group Lasso strength['{k}']") for k, v in strength.items()}
    lam = _number(strength, "group Lasso strength")
    return {k: lam for k in KINDS}


def _multipliers(multipliers: Mapping[str, float] | None) -> dict[str, float]:
    return {k: _number(m, f"multiplier '{k}'") for k, m in (multipliers or {}).items()}


def _check_lr(lr: float) -> None:
    """A NaN or infinite step would write NaN (or zeros) into every regularized weight."""
    if not 0 <= lr < math.inf:
        raise ConfigError(f"the regularizer's step lr must be a finite number >= 0, got {lr!r}; "
                          "check the learning-rate schedule")


class _Regularizer:
    """What GroupLasso and L1 share: the mode decides between the proximal step and penalty + threshold."""

    mode: Mode
    reset_momentum: bool = False

    def _set_mode(self, mode: Mode, threshold: float, reset_momentum: bool) -> None:
        """How the regularizer is optimized: ``mode``, the subgradient ``threshold``, ``reset_momentum``."""
        if mode not in ("prox", "subgradient"):
            raise ConfigError(f"mode must be 'prox' or 'subgradient', got {mode!r}")
        self.mode, self.threshold, self.reset_momentum = mode, threshold, bool(reset_momentum)

    @property
    def uses_penalty(self) -> bool:
        """True when :meth:`penalty` belongs in the loss (subgradient mode)."""
        return self.mode == "subgradient"

    def step_(self, lr: float, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call right after ``optimizer.step()``: prox in prox mode, thresholding otherwise.

        With ``reset_momentum`` and the optimizer, the momentum of every regularized weight that is now
        zero is zeroed too. Otherwise the velocity gathered before a group reached zero pushes it out
        again on the next steps, and once the learning rate has decayed the shrink ``lr·λ`` is too small
        to pull it back: the group ends near zero (1e-8) but not at zero, and cannot be cut. With the
        reset, a zero group stays zero while ``||∇_g L|| ≤ λ_g``, the proximal gradient's fixed point.
        """
        _check_lr(lr)
        if self.mode == "prox":
            self.prox_(lr)
        else:
            self.threshold_()
        if self.reset_momentum and optimizer is not None:
            _reset_momentum(optimizer, self._tensors())

    def _tensors(self) -> list[Tensor]:
        """The regularized tensors, each once."""
        raise NotImplementedError


@torch.no_grad()
def _reset_momentum(optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor]) -> None:
    """Zero the optimizer's running moments (SGD's ``momentum_buffer``, Adam's ``exp_avg``, ``exp_avg_sq``)
    where the weight is exactly zero."""
    for p in tensors:
        state = optimizer.state.get(p, {})
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            if state.get(key) is not None:
                state[key].masked_fill_(p == 0, 0.0)


class GroupLasso(_Regularizer):
    """λ·Σ_g ||w_g||₂ over the given groups, with the square root (SSL's ``R_g``).

    Two ways to optimize it:

    * ``mode="prox"`` (default): after each ``optimizer.step()`` call :meth:`step_` with the current
      learning rate; it applies the group soft-threshold ``w_g ← w_g · max(0, 1 − lr·λ_g/||w_g||)``,
      which reaches exact zeros. Do not add :meth:`penalty` to the loss then.
    * ``mode="subgradient"`` (the paper's Caffe code): add :meth:`penalty` to the loss (its gradient
      is ``λ_g · w_g/||w_g||``, 0 at 0) and call :meth:`step_` after each step, which zeroes weights
      with ``|w| < threshold`` (Caffe's ``ZEROUT_THRESHOLD = 1e-4``).

    Args:
        groups: from :func:`torchslim.structures`.
        strength: λ for every kind, or a mapping ``kind -> λ`` (kinds not in it get 0).
        multipliers: per-layer factors on λ keyed by layer, like Caffe's ``*_decay_mult``; ``"conv1:shape"``
            scales only that layer's shape groups (Caffe's ``kernel_shape_decay_mult``). The layer part follows
            ``include``'s rule; the longest matching key wins.
        include: the layers the Lasso acts on, as names, prefixes ending at ``.`` or globs (``"layer2"``,
            ``"*.conv1"``); ``None``, every layer. A family is named by its layer, the first of its producers
            (label ``"layer2.0.conv2+2"``: two more); one whose layer no pattern matches gets λ = 0.
        exclude: layers the Lasso leaves alone, by the same rule.
        weight_by_size: multiply λ_g by ``sqrt(|g|)``, the usual group-Lasso weighting.
        mode: ``"prox"`` or ``"subgradient"``.
        threshold: element threshold of the subgradient mode.
        reset_momentum: zero the momentum of weights that reach zero (pass the optimizer to
            :meth:`step_`), so zero groups stay zero; see :meth:`step_`.
        keep: the size budget's fraction (prox mode): once at most ``max(1, floor(keep·G))`` of a layer's ``G``
            groups of a kind are nonzero, the Lasso on that layer stops and its zero groups are held at zero, so
            λ decides which groups go and how fast, and ``keep`` where it stops (ISS on PTB: 1500 → 373
            is ``keep=0.25``); :meth:`meet_budget_` cuts layers that λ left above it by magnitude. A
            mapping gives one per kind; kinds not in it, and layers whose λ is 0, have no budget.
        keep_ramp: reach the budget over this many :meth:`step_` calls, on Zhu & Gupta's cubic
            ``k_t = k + (G − k)(1 − t/keep_ramp)³`` (:class:`~torchslim.regularize.budget.SizeBudget`'s ``ramp``).
            0: the budget is ``keep`` from the first step. ``steps`` counts the calls (set it when resuming).
        keep_cut: ``"end"`` (:meth:`meet_budget_` cuts what λ left above the budget) or ``"step"`` (cut to
            ``k_t`` by magnitude after every step): the budget's ``cut``.
        budget: the three above as one :class:`~torchslim.regularize.budget.SizeBudget`; pass it or them.

    Example:
        >>> import torch, torchslim
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> lasso = torchslim.GroupLasso(torchslim.structures(net, torch.randn(1, 4)), 1e-3)
        >>> lasso.penalty().shape
        torch.Size([])
    """

    def __init__(
        self,
        groups: Sequence[Group],
        strength: float | Mapping[str, float],
        *,
        multipliers: Mapping[str, float] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        weight_by_size: bool = False,
        mode: Mode = "prox",
        threshold: float = 1e-4,
        reset_momentum: bool = False,
        keep: float | Mapping[str, float] | None = None,
        keep_ramp: int = 0,
        keep_cut: Cut = "end",
        budget: SizeBudget | None = None,
    ) -> None:
        self._set_mode(mode, threshold, reset_momentum)
        self.budget = _size_budget(budget, keep, keep_ramp, keep_cut, mode)
        self.steps = 0  # proximal steps taken: the budget's clock t (set it when resuming)
        lam_of = _strengths(strength)
        multipliers = _multipliers(multipliers)
        buckets = families_of(list(groups))
        _check_selection(list(buckets), multipliers, include, exclude)
        self.blocks: list[_Block] = []
        for fam, members in buckets.items():
            lam = lam_of.get(fam.kind, 0.0) * _multiplier(fam, multipliers)
            if weight_by_size:
                lam *= fam.numel_per_member() ** 0.5
            chosen = include is None or any(_selects(p, fam) for p in include)
            if lam > 0 and chosen and not any(_selects(p, fam) for p in exclude):
                block = _Block(fam, members, torch.full((len(members),), lam))
                if self.budget is not None:  # a run resumed after its budget was met is met again
                    block.held = self.budget.layer(fam.kind, self._nonzero(block))
                self.blocks.append(block)

    def _tensors(self) -> list[Tensor]:
        out: dict[int, Tensor] = {}
        for b in self.blocks:
            for st in b.family.weight_stripes():
                p = b.family.params[st.param]
                out.setdefault(id(p), p)
        return list(out.values())

    def _norms(self, block: _Block) -> Tensor:
        """``||w_g||`` of the block's groups, ``(G_f,)``; gradient ``w/||w||`` and 0 at 0."""
        sq = block.family.row_sq()[block.members.to(self._device(block))]
        return sq.clamp_min(1e-30).sqrt()

    @staticmethod
    def _device(block: _Block) -> torch.device:
        return block.family.params[block.family.stripes[0].param].device

    def penalty(self) -> Tensor:
        """``Σ_g λ_g ||w_g||₂``, a differentiable 0-d tensor."""
        total = torch.zeros(())
        for b in self.blocks:
            dev = self._device(b)
            total = total.to(dev) + (b.lam.to(dev) * self._norms(b)).sum()
        return total

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        """Group soft-threshold with step ``lr``: the proximal operator of ``lr·λ_g||w_g||``, then the size budget.

        ``w_g ← w_g·max(0, 1 − lr·λ_g/||w_g||)``, each factor adjusted by :meth:`SizeBudget.adjust
        <torchslim.regularize.budget.SizeBudget.adjust>` on layers with a budget. Overlapping groups (say
        ``filter`` and ``shape`` on one weight) are shrunk by the product of their factors, all computed from
        the weights before this step.
        """
        _check_lr(lr)
        factors = []
        for b in self.blocks:
            norms = self._norms(b)
            shrink = (1 - lr * b.lam.to(norms.device) / norms).clamp_min(0)  # (G_f,)
            if b.held is not None:
                shrink = self.budget.adjust(b.held, norms, shrink, self.steps)
            factors.append((b, shrink))
        self.steps += 1
        self._scale_(factors)

    @torch.no_grad()
    def meet_budget_(self) -> dict[str, int]:
        """Zero the smallest groups of every layer still above its ``keep`` budget: call after the last step.

        λ may not have thinned a layer far enough when the phase ends; the budget is then met by magnitude,
        as a pruning ratio would be. Returns ``{layer label: groups zeroed}``.
        """
        cut, factors = {}, []
        for b in self.blocks:
            if b.held is None or b.held.met:
                continue
            norms = self._norms(b)
            nonzero = int(self._nonzero(b).sum())
            b.held.hold_(norms)
            factors.append((b, b.held.alive(norms.dtype)))
            if nonzero > b.held.keep:
                cut[b.family.label] = nonzero - b.held.keep
        self._scale_(factors)
        return cut

    def _nonzero(self, block: _Block) -> Tensor:
        """``(G_f,)`` bool: the block's groups with any nonzero weight."""
        return block.family.row_sq()[block.members.to(self._device(block))] > 0

    @staticmethod
    def _scale_(factors: Sequence[tuple[_Block, Tensor]]) -> None:
        """Multiply every group of each block by its factor ``(G_f,)``; overlapping groups multiply."""
        scales: dict[tuple[int, int, bool], tuple[Tensor, Tensor]] = {}  # (param, dim, flat) -> (p, factors)
        for b, factor in factors:
            dev = factor.device
            for s in b.family.weight_stripes():
                p = b.family.params[s.param]
                _, vec = scales.setdefault((id(p), s.dim, s.flat), (p, torch.ones(s.rows(p), device=dev)))
                idx, held = s.member_rows(b.members)
                vec[idx.to(dev)] *= factor[held.to(dev)].repeat_interleave(s.width)  # idx unique within a family
        for (_, dim, flat), (p, vec) in scales.items():
            v = p.flatten(dim) if flat else p
            shape = [1] * v.dim()
            shape[dim] = -1
            p.mul_(vec.view(shape).expand_as(v).reshape(p.shape))  # flat: fibers of p.flatten(dim)

    @torch.no_grad()
    def threshold_(self) -> None:
        """Zero every regularized weight with ``|w| < threshold`` (the paper's ``Zerout``)."""
        seen = set()
        for b in self.blocks:
            for s in b.family.weight_stripes():
                p = b.family.params[s.param]
                if id(p) not in seen:
                    seen.add(id(p))
                    p.masked_fill_(p.abs() < self.threshold, 0.0)

    def zero_fraction(self) -> dict[str, float]:
        """Fraction of all-zero groups per regularized kind."""
        groups = [Group(b.family, int(k)) for b in self.blocks for k in b.members]
        return {kind: zero / total for kind, (zero, total) in zero_counts(groups).items()}


class L1(_Regularizer):
    """Element-wise ℓ1, ``λ·Σ_w |w|``: the unstructured baseline the ISS paper compares with (its ``l1.json``).

    The same interface as :class:`GroupLasso` (``penalty``, ``prox_``, ``threshold_``, ``step_``,
    ``uses_penalty``, ``zero_fraction``), so :class:`torchslim.train.loop.Regularizers` takes either as its
    ``lasso`` (a recipe cannot select it: its kinds are group kinds). Its proximal step
    is the element-wise soft-threshold ``w ← sign(w)·max(|w| − lr·λ, 0)``: many exact zeros, scattered,
    so few whole hidden units or channels end up zero and :func:`torchslim.compact` can cut little.
    It is a class of its own, not a group kind: one group per weight would be one Python object each.

    Args:
        params: what to regularize, whole tensors: an ``nn.Module`` (all its parameters), a mapping
            ``{name: tensor}``, or groups from :func:`torchslim.structures` (every parameter they touch,
            e.g. ``kinds=("hidden",)``: the LSTM's weights and biases and the decoder, as ISS). A tensor
            shared under two names (tied weights) counts once, under its first name.
        strength: λ, a number >= 0.
        multipliers: per-parameter factors on λ keyed by name, prefix ending at ``.`` or glob (``"lstm"``,
            ``"fc.bias"``, ``"*.bias"``); the longest matching key wins. A key that matches no parameter raises :class:`ConfigError`.
        mode: ``"prox"`` (call :meth:`step_` after each ``optimizer.step()``; do not add :meth:`penalty`)
            or ``"subgradient"`` (add :meth:`penalty` to the loss; :meth:`step_` zeroes ``|w| < threshold``).
        threshold: element threshold of the subgradient mode.
        reset_momentum: as :class:`GroupLasso`'s, for single weights.

    Example:
        >>> import torch, torchslim
        >>> from torchslim.regularize.lasso import L1
        >>> layer = torch.nn.Linear(4, 3)
        >>> l1 = L1(layer, 1e-3)
        >>> bool(torch.isclose(l1.penalty(), 1e-3 * (layer.weight.abs().sum() + layer.bias.abs().sum())))
        True
        >>> l1.step_(1000.0)  # lr·λ = 1 > every |w| of a fresh Linear(4, 3) (at most 1/sqrt(4)): all zero
        >>> l1.zero_fraction()
        {'weight': 1.0}
    """

    def __init__(
        self,
        params: torch.nn.Module | Mapping[str, Tensor] | Sequence[Group],
        strength: float,
        *,
        multipliers: Mapping[str, float] | None = None,
        mode: Mode = "prox",
        threshold: float = 1e-4,
        reset_momentum: bool = False,
    ) -> None:
        self._set_mode(mode, threshold, reset_momentum)
        strength = _number(strength, "L1 strength")
        named = _named_tensors(params)
        if not named:
            raise ConfigError("L1 got no parameters to regularize")
        multipliers = _multipliers(multipliers)
        for key in multipliers:
            if not any(matches(key, name) for name in named):
                close = difflib.get_close_matches(key, list(named), n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"multiplier '{key}' selects no parameter{hint}; parameters: {', '.join(named)}")
        self.params: list[tuple[str, Tensor, float]] = []  # (name, tensor, λ) with λ > 0
        for name, p in named.items():
            best, factor = -1, 1.0
            for key, m in multipliers.items():
                if matches(key, name) and len(key) > best:
                    best, factor = len(key), float(m)
            if strength * factor > 0:
                self.params.append((name, p, float(strength) * factor))

    def _tensors(self) -> list[Tensor]:
        return [p for _, p, _ in self.params]

    def penalty(self) -> Tensor:
        """``Σ_p λ_p Σ |w|``, a differentiable 0-d tensor (gradient ``λ·sign(w)``, 0 at 0)."""
        total = torch.zeros(())
        for _, p, lam in self.params:
            total = total.to(p.device) + lam * p.abs().sum()
        return total

    @torch.no_grad()
    def prox_(self, lr: float) -> None:
        """Element-wise soft-threshold with step ``lr``: ``w ← sign(w)·max(|w| − lr·λ, 0)``."""
        _check_lr(lr)
        for _, p, lam in self.params:
            p.copy_(p.sign() * (p.abs() - lr * lam).clamp_min(0))

    @torch.no_grad()
    def threshold_(self) -> None:
        """Zero every regularized weight with ``|w| < threshold``."""
        for _, p, _ in self.params:
            p.masked_fill_(p.abs() < self.threshold, 0.0)

    @torch.no_grad()
    def zero_fraction(self) -> dict[str, float]:
        """``{"weight": fraction of the regularized weights that are exactly 0}``."""
        zero = sum(int((p == 0).sum()) for _, p, _ in self.params)
        total = sum(p.numel() for _, p, _ in self.params)
        return {"weight": zero / max(total, 1)}


def _named_tensors(params: torch.nn.Module | Mapping[str, Tensor] | Sequence[Group]) -> dict[str, Tensor]:
    """``{name: tensor}`` of a module, a mapping or groups' parameters; a shared tensor once."""
    if isinstance(params, torch.nn.Module):
        items = list(params.named_parameters())
    elif isinstance(params, Mapping):
        items = list(params.items())
    else:
        groups = list(params)
        if not all(isinstance(g, Group) for g in groups):
            raise ConfigError("L1 takes an nn.Module, a {name: tensor} mapping or groups from torchslim.structures")
        items = [(s.param, fam.params[s.param]) for fam in families_of(groups) for s in fam.weight_stripes()]
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, p in items:
        if not isinstance(p, Tensor):
            raise ConfigError(f"L1: '{name}' is a {type(p).__name__}, not a tensor")
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out
