"""Group Lasso (SSL, Wen et al. 2016): ``R_g(W) = Σ_g λ_g ||w_g||_2``, as a penalty or a proximal step.

:class:`L1` is the element-wise ``λ·Σ|w|`` beside it, the unstructured baseline of ISS (Wen et al., ICLR 2018).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from torchslim.errors import ConfigError
from torchslim.structure.groups import KINDS, Family, Group, families_of, zero_counts

Mode = Literal["prox", "subgradient"]


@dataclass(eq=False)
class _Block:
    """The groups of one family in the regularizer: member indices, their λ_g, and the size budget."""

    family: Family
    members: Tensor  # (G_f,) long
    lam: Tensor  # (G_f,) λ_g, kind strength × layer multiplier × optional sqrt(|g|)
    keep: int | None = None  # stop once at most this many groups are nonzero
    dead: Tensor | None = None  # (G_f,) bool: the groups held at zero once ``keep`` was reached


def _matches(prefix: str, label: str) -> bool:
    return label == prefix or label.startswith(prefix + ".") or label.startswith(prefix + "+")


def _multiplier(fam: Family, multipliers: Mapping[str, float]) -> float:
    """Factor on λ for a family: the longest matching key wins, ``"layer:kind"`` before ``"layer"``."""
    best, factor = (-1, -1), 1.0
    for key, m in multipliers.items():
        prefix, _, kind = key.partition(":")
        if _matches(prefix, fam.label) and kind in ("", fam.kind) and (len(prefix), len(kind)) > best:
            best, factor = (len(prefix), len(kind)), float(m)
    return factor


def _keep_per_kind(keep: float | Mapping[str, float] | None) -> dict[str, float]:
    """``keep`` as ``{kind: fraction}``: one value for every kind, or a mapping."""
    if keep is None:
        return {}
    out = {k: float(v) for k, v in keep.items()} if isinstance(keep, Mapping) else dict.fromkeys(KINDS, float(keep))
    bad = {k: v for k, v in out.items() if k not in KINDS or not 0 < v <= 1}
    if bad:
        raise ConfigError(f"keep must map kinds in {list(KINDS)} to fractions in (0, 1] (1 keeps every group), got {bad}")
    return out


def _check_multipliers(families: Sequence[Family], multipliers: Mapping[str, float]) -> None:
    """Every key must select some family: a typo would otherwise silently change nothing."""
    labels = sorted({f.label.split("+")[0] for f in families})
    for key in multipliers:
        prefix, _, kind = key.partition(":")
        if not any(_matches(prefix, f.label) and kind in ("", f.kind) for f in families):
            close = difflib.get_close_matches(prefix, labels, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"multiplier '{key}' selects no group{hint}; keys are 'layer' or 'layer:kind' "
                f"with layers {', '.join(labels)}"
            )


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
        if self.mode == "prox":
            self.prox_(lr)
        else:
            self.threshold_()
        if self.reset_momentum and optimizer is not None:
            _reset_momentum(optimizer, self._tensors())

    def _tensors(self) -> list[Tensor]:
        """The regularized tensors, each once."""
        raise NotImplementedError


def _smallest(norms: Tensor, k: int) -> Tensor:
    """``(G,)`` bool: every group but the ``k`` of largest norm."""
    out = torch.ones_like(norms, dtype=torch.bool)
    out[norms.topk(k).indices] = False
    return out


@torch.no_grad()
def _reset_momentum(optimizer: torch.optim.Optimizer, tensors: Sequence[Tensor]) -> None:
    """Zero the momentum buffer (SGD's ``momentum_buffer``) where the weight is exactly zero."""
    for p in tensors:
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            buf.masked_fill_(p == 0, 0.0)


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
        multipliers: per-layer factors on λ keyed by module name (prefix match), like Caffe's
            ``*_decay_mult``; ``"conv1:shape"`` scales only that layer's shape groups (Caffe's
            ``kernel_shape_decay_mult``).
        weight_by_size: multiply λ_g by ``sqrt(|g|)``, the usual group-Lasso weighting.
        mode: ``"prox"`` or ``"subgradient"``.
        threshold: element threshold of the subgradient mode.
        reset_momentum: zero the momentum of weights that reach zero (pass the optimizer to
            :meth:`step_`), so zero groups stay zero; see :meth:`step_`.
        keep: a size budget (prox mode): once at most ``max(1, floor(keep·G))`` of a layer's ``G`` groups of a
            kind are nonzero, the Lasso on that layer stops and its zero groups are held at zero, so
            λ decides which groups go and how fast, and ``keep`` where it stops (ISS on PTB: 1500 → 373
            is ``keep=0.25``); :meth:`meet_budget_` cuts layers that λ left above it by magnitude. A
            mapping gives one per kind; kinds not in it, and layers whose λ is 0, have no budget.
        keep_ramp: reach the budget gradually, over this many :meth:`step_` calls: the groups a layer may keep
            fall from all ``G`` to ``keep·G`` on Zhu & Gupta's cubic (2017, "To prune, or not to prune"),
            ``k_t = k + (G − k)(1 − t/keep_ramp)³``. While a layer is at or under ``k_t`` its Lasso pauses
            (its ``k_t`` largest groups kept, the rest held at zero), so a strong λ cannot thin it faster
            than the ramp. 0: the budget is ``keep`` from the first step. ``steps`` counts the calls (set it
            when resuming).
        keep_cut: where a layer that λ has left above its budget is cut to it by magnitude: ``"end"``, by
            :meth:`meet_budget_` once the phase is over; ``"step"``, to ``k_t`` after every step, so each
            layer follows the ramp even where λ is too weak to (from a converged model, say) and λ only
            shapes which groups are smallest (Zhu & Gupta's gradual pruning with the group Lasso beside it).

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
        weight_by_size: bool = False,
        mode: Mode = "prox",
        threshold: float = 1e-4,
        reset_momentum: bool = False,
        keep: float | Mapping[str, float] | None = None,
        keep_ramp: int = 0,
        keep_cut: Literal["end", "step"] = "end",
    ) -> None:
        self._set_mode(mode, threshold, reset_momentum)
        keep_of = _keep_per_kind(keep)
        if keep_of and mode != "prox":
            raise ConfigError("keep (a size budget) needs mode='prox', which reaches exact zeros; "
                              "remove keep or use mode='prox'")
        if keep_ramp < 0 or (keep_ramp and not keep_of):
            raise ConfigError(f"keep_ramp must be >= 0 steps and needs keep (the budget it falls to), got "
                              f"keep_ramp={keep_ramp}, keep={keep}")
        if keep_cut not in ("end", "step") or (keep_cut == "step" and not keep_of):
            raise ConfigError(f"keep_cut must be 'end' or 'step', and 'step' needs keep (the budget it cuts to), got "
                              f"keep_cut={keep_cut!r}, keep={keep}")
        self.keep_ramp, self.keep_cut, self.steps = int(keep_ramp), keep_cut, 0
        if isinstance(strength, Mapping):
            bad = [k for k in strength if k not in KINDS]
            if bad:
                raise ConfigError(f"strength has unknown kinds {bad}; choose from {list(KINDS)}")
            lam_of = {k: float(v) for k, v in strength.items()}
        else:
            lam_of = {k: float(strength) for k in KINDS}
        if any(v < 0 for v in lam_of.values()):
            raise ConfigError(f"group Lasso strengths must be >= 0, got {lam_of}")
        self.blocks: list[_Block] = []
        buckets = families_of(list(groups))
        _check_multipliers(list(buckets), multipliers or {})
        for fam, members in buckets.items():
            lam = lam_of.get(fam.kind, 0.0) * _multiplier(fam, multipliers or {})
            if weight_by_size:
                lam *= fam.numel_per_member() ** 0.5
            if lam > 0:
                block = _Block(fam, members, torch.full((len(members),), lam))
                if fam.kind in keep_of:
                    block.keep = max(1, int(keep_of[fam.kind] * len(members)))  # a layer keeps a unit
                    nonzero = self._nonzero(block)  # a run resumed after its budget was met is met again
                    if int(nonzero.sum()) <= block.keep:
                        block.dead = ~nonzero
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
        """Group soft-threshold with step ``lr``: the proximal operator of ``lr·λ_g||w_g||``.

        Overlapping groups (say ``filter`` and ``shape`` on one weight) are shrunk by the product of
        their factors, all computed from the weights before this step.
        """
        factors = []
        for b in self.blocks:
            norms = self._norms(b)
            shrink = (1 - lr * b.lam.to(norms.device) / norms).clamp_min(0)  # (G_f,)
            if b.keep is not None and b.dead is None:
                k = self._budget(b)
                if int((shrink > 0).sum()) <= k:
                    if k == b.keep:
                        self._hold(b, norms)
                    else:  # on the ramp: pause until the budget falls below the groups left
                        shrink = (~_smallest(norms, k)).to(norms.dtype)
                elif self.keep_cut == "step":  # still above k_t after the shrink: the smallest go now
                    shrink = shrink * (~_smallest(norms * shrink, k)).to(norms.dtype)
            factors.append((b, shrink if b.dead is None else (~b.dead).to(norms.dtype)))
        self.steps += 1
        self._scale_(factors)

    def _budget(self, b: _Block) -> int:
        """``k_t``: the groups block ``b`` may keep at this step (``b.keep`` once the ramp is over)."""
        if self.steps >= self.keep_ramp:
            return b.keep
        left = (1 - self.steps / self.keep_ramp) ** 3
        return b.keep + int((len(b.members) - b.keep) * left)

    @torch.no_grad()
    def meet_budget_(self) -> dict[str, int]:
        """Zero the smallest groups of every layer still above its ``keep`` budget: call after the last step.

        λ may not have thinned a layer far enough when the phase ends; the budget is then met by magnitude,
        as a pruning ratio would be. Returns ``{layer label: groups zeroed}``.
        """
        cut, factors = {}, []
        for b in self.blocks:
            if b.keep is None or b.dead is not None:
                continue
            norms = self._norms(b)
            nonzero = int(self._nonzero(b).sum())
            self._hold(b, norms)
            factors.append((b, (~b.dead).to(norms.dtype)))
            if nonzero > b.keep:
                cut[b.family.label] = nonzero - b.keep
        self._scale_(factors)
        return cut

    def _nonzero(self, block: _Block) -> Tensor:
        """``(G_f,)`` bool: the block's groups with any nonzero weight."""
        return block.family.row_sq()[block.members.to(self._device(block))] > 0

    @staticmethod
    def _hold(b: _Block, norms: Tensor) -> None:
        """The budget is met: keep the ``b.keep`` largest groups, hold the others at zero from now on."""
        b.dead = _smallest(norms, b.keep)

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
    ``uses_penalty``, ``zero_fraction``), so :func:`torchslim.train.engine.train_epoch` takes either as its
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
        multipliers: per-parameter factors on λ keyed by name prefix (``"lstm"``, ``"fc.bias"``); the
            longest matching key wins. A key that matches no parameter raises :class:`ConfigError`.
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
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not strength >= 0:
            raise ConfigError(f"L1 strength must be a number >= 0, got {strength!r}")
        named = _named_tensors(params)
        if not named:
            raise ConfigError("L1 got no parameters to regularize")
        multipliers = dict(multipliers or {})
        for key in multipliers:
            if not any(_matches(key, name) for name in named):
                close = difflib.get_close_matches(key, list(named), n=1, cutoff=0.5)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"multiplier '{key}' selects no parameter{hint}; parameters: {', '.join(named)}")
        self.params: list[tuple[str, Tensor, float]] = []  # (name, tensor, λ) with λ > 0
        for name, p in named.items():
            best, factor = -1, 1.0
            for key, m in multipliers.items():
                if _matches(key, name) and len(key) > best:
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
