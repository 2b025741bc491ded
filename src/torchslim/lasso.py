"""Group Lasso (SSL, Wen et al. 2016): ``R_g(W) = Σ_g λ_g ||w_g||_2``, as a penalty or a proximal step."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor

from torchslim.errors import ConfigError
from torchslim.groups import KINDS, Family, Group, families_of, zero_counts

Mode = Literal["prox", "subgradient"]


@dataclass(frozen=True, eq=False)
class _Block:
    """The groups of one family in the regularizer: member indices and their λ_g."""

    family: Family
    members: Tensor  # (G_f,) long
    lam: Tensor  # (G_f,) λ_g, kind strength × layer multiplier × optional sqrt(|g|)


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


class GroupLasso:
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
    ) -> None:
        if mode not in ("prox", "subgradient"):
            raise ConfigError(f"mode must be 'prox' or 'subgradient', got {mode!r}")
        if isinstance(strength, Mapping):
            bad = [k for k in strength if k not in KINDS]
            if bad:
                raise ConfigError(f"strength has unknown kinds {bad}; choose from {list(KINDS)}")
            lam_of = {k: float(v) for k, v in strength.items()}
        else:
            lam_of = {k: float(strength) for k in KINDS}
        if any(v < 0 for v in lam_of.values()):
            raise ConfigError(f"group Lasso strengths must be >= 0, got {lam_of}")
        self.mode: Mode = mode
        self.threshold = threshold
        self.blocks: list[_Block] = []
        buckets = families_of(list(groups))
        _check_multipliers(list(buckets), multipliers or {})
        for fam, members in buckets.items():
            lam = lam_of.get(fam.kind, 0.0) * _multiplier(fam, multipliers or {})
            if weight_by_size:
                lam *= fam.numel_per_member() ** 0.5
            if lam > 0:
                self.blocks.append(_Block(fam, members, torch.full((len(members),), lam)))

    @property
    def uses_penalty(self) -> bool:
        """True when :meth:`penalty` belongs in the loss (subgradient mode)."""
        return self.mode == "subgradient"

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
        scales: dict[tuple[int, int, bool], tuple[Tensor, Tensor]] = {}  # (param, dim, flat) -> (p, factors)
        for b in self.blocks:
            dev = self._device(b)
            norms = self._norms(b)
            shrink = (1 - lr * b.lam.to(dev) / norms).clamp_min(0)  # (G_f,)
            for s in b.family.weight_stripes():
                p = b.family.params[s.param]
                _, vec = scales.setdefault((id(p), s.dim, s.flat), (p, torch.ones(s.rows(p), device=dev)))
                idx, held = s.member_rows(b.members)
                vec[idx.to(dev)] *= shrink[held.to(dev)].repeat_interleave(s.width)  # idx unique within a family
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

    def step_(self, lr: float) -> None:
        """Call right after ``optimizer.step()``: prox in prox mode, thresholding otherwise."""
        if self.mode == "prox":
            self.prox_(lr)
        else:
            self.threshold_()

    def zero_fraction(self) -> dict[str, float]:
        """Fraction of all-zero groups per regularized kind."""
        groups = [Group(b.family, int(k)) for b in self.blocks for k in b.members]
        return {kind: zero / total for kind, (zero, total) in zero_counts(groups).items()}
