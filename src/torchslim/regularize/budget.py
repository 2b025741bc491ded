"""The size budget beside the group Lasso: how many groups each layer may keep, and when it stops thinning.

λ decides which groups go and how fast; the budget decides where a layer stops. A layer of ``G`` groups of
a kind with a budget fraction ``keep`` ends with ``k = max(1, floor(keep·G))`` of them (ISS on PTB: 1500 → 373
hidden units is ``keep=0.25``). Reached gradually, the groups a layer may keep after ``t`` proximal steps follow
Zhu & Gupta's cubic (2017, "To prune, or not to prune: exploring the efficacy of pruning for model
compression"):

    k_t = k + (G − k)·(1 − t/T)³   for t < T (the ramp),   k_t = k   after it.

:class:`SizeBudget` is what the user tunes (frozen); :class:`LayerBudget` is what the run accumulates for one
layer (the groups held at zero once the budget was met). The step clock ``t`` is the Lasso's ``steps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
from torch import Tensor

from torchslim.errors import ConfigError
from torchslim.structure.groups import KINDS

Cut = Literal["end", "step"]

__all__ = ["Cut", "LayerBudget", "SizeBudget"]


def _smallest(norms: Tensor, k: int) -> Tensor:
    """``(G,)`` bool: every group but the ``k`` of largest norm."""
    out = torch.ones_like(norms, dtype=torch.bool)
    out[norms.topk(k).indices] = False
    return out


@dataclass(eq=False)
class LayerBudget:
    """What the run accumulates for one layer's groups of one kind (one family of the Lasso)."""

    keep: int  # k = max(1, floor(keep·G)): the groups the layer ends with
    size: int  # G: the groups it starts with
    dead: Tensor | None = None  # (G,) bool: the groups held at zero once the budget was met; None before

    @property
    def met(self) -> bool:
        """The layer reached its budget: from now on only its ``keep`` groups live."""
        return self.dead is not None

    def hold_(self, norms: Tensor) -> None:
        """Meet the budget: keep the ``keep`` groups of largest ``norms`` ``(G,)``, hold the others at zero."""
        self.dead = _smallest(norms, self.keep)

    def alive(self, dtype: torch.dtype) -> Tensor:
        """``(G,)`` factor of a met layer: 1 for a kept group, 0 for a held one."""
        return (~self.dead).to(dtype)


@dataclass(frozen=True)
class SizeBudget:
    """How many groups each layer may keep (``keep``), how fast it gets there (``ramp``), how it is enforced (``cut``).

    Args:
        keep: the fraction ``keep`` of a layer's ``G`` groups it ends with, ``k = max(1, floor(keep·G))`` (a layer
            keeps a unit); one number for every kind, or a mapping ``kind -> fraction`` (kinds not in it have no
            budget). Stored as the mapping.
        ramp: ``T``, the proximal steps over which the groups a layer may keep fall from ``G`` to ``k`` on the
            cubic ``k_t`` (module docstring). While a layer is at or under ``k_t`` its Lasso pauses (its ``k_t``
            largest groups kept, the rest held at zero), so a strong λ cannot thin it faster than the ramp.
            0: the budget is ``k`` from the first step.
        cut: where a layer that λ left above its budget is cut to it by magnitude: ``"end"``, by the Lasso's
            ``meet_budget_`` once the phase is over; ``"step"``, to ``k_t`` after every step (Zhu & Gupta's gradual
            pruning with the group Lasso beside it: λ only shapes which groups are smallest).
    Raises:
        ConfigError: a kind outside the group kinds, a fraction outside (0, 1], a negative ramp or an unknown cut;
            a ramp or ``cut="step"`` without ``keep``.

    Example:
        >>> budget = SizeBudget(0.3, ramp=8)
        >>> [budget.groups_at(LayerBudget(keep=3, size=10), t) for t in (0, 1, 2, 8, 9)]
        [10, 7, 5, 3, 3]
    """

    keep: float | Mapping[str, float] = field(default_factory=dict)  # stored as {kind: fraction}
    ramp: int = 0
    cut: Cut = "end"

    def __post_init__(self) -> None:
        keep = self.keep
        if isinstance(keep, Mapping):
            fractions = {k: float(v) for k, v in keep.items()}
        else:
            fractions = dict.fromkeys(KINDS, float(keep))
        bad = {k: v for k, v in fractions.items() if k not in KINDS or not 0 < v <= 1}
        if bad:
            raise ConfigError(f"keep must map kinds in {list(KINDS)} to fractions in (0, 1] (1 keeps every group), "
                              f"got {bad}")
        if self.ramp < 0 or (self.ramp and not fractions):
            raise ConfigError(f"keep_ramp (the budget's ramp) must be >= 0 steps and needs keep (the budget it falls "
                              f"to), got keep_ramp={self.ramp}, keep={keep}")
        if self.cut not in ("end", "step") or (self.cut == "step" and not fractions):
            raise ConfigError(f"keep_cut (the budget's cut) must be 'end' or 'step', and 'step' needs keep (the budget "
                              f"it cuts to), got keep_cut={self.cut!r}, keep={keep}")
        object.__setattr__(self, "keep", fractions)
        object.__setattr__(self, "ramp", int(self.ramp))

    def __bool__(self) -> bool:
        """A budget with no kind in ``keep`` limits nothing."""
        return bool(self.keep)

    def layer(self, kind: str, nonzero: Tensor) -> LayerBudget | None:
        """The state of one layer's groups of ``kind``, ``nonzero: (G,) bool``; None for a kind without budget.

        A layer already at or under ``k`` (a run resumed after its budget was met) is met again at once.
        """
        if kind not in self.keep:
            return None
        size = len(nonzero)
        state = LayerBudget(max(1, int(self.keep[kind] * size)), size)  # a layer keeps a unit
        if int(nonzero.sum()) <= state.keep:
            state.dead = ~nonzero
        return state

    def groups_at(self, layer: LayerBudget, step: int) -> int:
        """``k_t``: the groups ``layer`` may keep at step ``t = step`` (``k`` once the ramp is over)."""
        if step >= self.ramp:
            return layer.keep
        left = (1 - step / self.ramp) ** 3
        return layer.keep + int((layer.size - layer.keep) * left)

    def adjust(self, layer: LayerBudget, norms: Tensor, shrink: Tensor, step: int) -> Tensor:
        """The Lasso's shrink factors ``(G,)`` for ``layer`` at ``step``, after the budget had its say.

        Args:
            layer: this layer's state; met here (``hold_``) when the shrink leaves it at ``k``.
            norms: ``||w_g||`` before the step, ``(G,)``.
            shrink: the group soft-threshold's ``max(0, 1 − lr·λ_g/||w_g||)``, ``(G,)``.
            step: ``t``, proximal steps taken before this one.
        Returns:
            ``(G,)`` factors: ``shrink`` itself while the layer is above ``k_t`` (cut to ``k_t`` by magnitude
            with ``cut="step"``); 1/0 keeping the ``k_t`` largest groups once the shrink would reach ``k_t``
            (the Lasso pauses on the ramp, and stops for good at ``k``).
        """
        if layer.met:
            return layer.alive(norms.dtype)
        k = self.groups_at(layer, step)
        if int((shrink > 0).sum()) <= k:
            if k == layer.keep:
                layer.hold_(norms)
                return layer.alive(norms.dtype)
            return (~_smallest(norms, k)).to(norms.dtype)  # on the ramp: pause until k_t falls below the groups left
        if self.cut == "step":  # still above k_t after the shrink: the smallest go now
            return shrink * (~_smallest(norms * shrink, k)).to(norms.dtype)
        return shrink
