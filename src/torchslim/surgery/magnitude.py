"""One-shot magnitude pruning: the baseline SSL is compared with at equal multiply-adds.

Rank the removable channel/neuron groups of a trained dense model by their L2 norm ``||w_g||``,
zero the lowest, and cut them out with :func:`~torchslim.surgery.compact.compact`: the one-shot criterion
of Li et al. 2017 ("Pruning Filters for Efficient ConvNets"), with the L2 norm of the whole coupled
group (filter, bias, BatchNorm entries, consumers' input columns) in place of a filter's L1 norm.
Fine-tuning afterwards is the caller's: ``benchmarks/ssl_vs_magnitude.py`` does it with a recipe's.
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from torchslim._inputs import Inputs, as_tuple
from torchslim.errors import ConfigError
from torchslim.macs import count_macs
from torchslim.structure.groups import Family, Group, families_of
from torchslim.structure.tracing import structures
from torchslim.surgery.compact import compact

log = logging.getLogger(__name__)

Scope = Literal["layer", "global"]
_DEFAULT_KINDS = ("channel", "neuron")
_PRUNABLE_KINDS = ("channel", "neuron", "head", "embed")  # the kinds compact() cuts out when zero
_EPS = 1e-9  # ⌊amount·n⌋ for amount = j/n must give j despite float rounding


def magnitude_prune(
    model: nn.Module,
    example_inputs: Inputs,
    amount: float | None = None,
    *,
    target_macs: float | None = None,
    kinds: Sequence[str] = _DEFAULT_KINDS,
    scope: Scope = "layer",
) -> nn.Module:
    """A compact copy of ``model`` without its lowest-norm channel/neuron (or head, width) groups.

    1. ``groups = structures(model, example_inputs, kinds)``; a family is one layer's channels (in a
       ResNet, the channels that residual additions couple across a stage).
    2. ``scope="layer"``: in every family of ``n`` members, the ``k = ⌊amount·n⌋`` of least
       ``||w_g||_2`` are zeroed. ``scope="global"``: all ``G`` groups are ranked by
       ``||w_g||_2 / sqrt(|g|)`` (the RMS of a weight, comparable across layers) and the lowest
       ``⌊amount·G⌋`` zeroed. Either way a family keeps at least one member, and every norm is
       taken on ``model`` before any zeroing (coupled families share weights: a residual block's
       ``conv2`` rows are trunk channels, its columns the block's inner channels).
    3. The zeroed copy is cut down by :func:`~torchslim.surgery.compact.compact` (checked against it).

    Args:
        model: a trained dense model; it is not changed.
        example_inputs: a tensor or a sequence of tensors the model accepts, e.g. ``(B, 1, 28, 28)``;
            MACs are per sample.
        amount: the fraction of groups to remove, in ``[0, 1)``.
        target_macs: instead of ``amount``: the least pruning (the smallest ``amount``, found by
            bisection over the steps at which one more group goes) whose compact model has at most
            this many multiply-adds per sample, as ``torchslim.profile(model, x, latency=False).macs`` counts.
        kinds: group kinds to prune, a non-empty subset of ``("channel", "neuron", "head", "embed")``: a
            transformer's attention heads (q, k, v rows and output columns) and its width (the residual
            stream) rank by the same group norm.
        scope: ``"layer"`` (the same fraction of every layer) or ``"global"`` (one ranking).
    Returns:
        the compact model, in eval mode: standard layers, narrower where groups went.
    Raises:
        ConfigError: not exactly one of ``amount`` and ``target_macs``; a value out of range; an
            unknown ``kinds`` or ``scope``; a model without such groups; a ``target_macs`` below what
            pruning every layer down to one member reaches.

    Example:
        >>> import torch, torchslim
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 10), torch.nn.ReLU(), torch.nn.Linear(10, 2))
        >>> small = torchslim.magnitude_prune(net, torch.randn(4, 8), amount=0.3)
        >>> small[0].out_features
        7
    """
    _check_args(amount, target_macs, kinds, scope)
    inputs = as_tuple(example_inputs)
    groups = structures(model, inputs, kinds=tuple(kinds))
    if not groups:
        raise ConfigError(
            f"{type(model).__name__} has no removable {'/'.join(kinds)} groups to prune: "
            f"structures(model, x, kinds={tuple(kinds)}) is empty. Try kinds=('channel', 'neuron'), or check "
            "the log of structures() for layers whose channels it could not follow."
        )
    scores, family_ids = _scores(groups, scope)
    if amount is not None:
        return _pruned(model, inputs, kinds, _select(scores, family_ids, amount, scope))
    return _search(model, inputs, kinds, scores, family_ids, scope, float(target_macs))


def _check_args(amount: float | None, target_macs: float | None, kinds: Sequence[str], scope: str) -> None:
    if (amount is None) == (target_macs is None):
        raise ConfigError("give exactly one of amount (a fraction of groups, e.g. 0.5) and target_macs "
                          f"(multiply-adds per sample), got amount={amount}, target_macs={target_macs}")
    if amount is not None and not (_is_number(amount) and 0 <= amount < 1):
        raise ConfigError(f"amount must be a fraction in [0, 1), got {amount!r}; "
                          "a layer always keeps one member, so 1 cannot be reached")
    if target_macs is not None and not (_is_number(target_macs) and target_macs > 0):
        raise ConfigError(f"target_macs must be a positive number of multiply-adds per sample, got {target_macs!r}; "
                          "see torchslim.profile(model, x, latency=False).macs")
    if isinstance(kinds, str) or not kinds or any(k not in _PRUNABLE_KINDS for k in kinds):
        raise ConfigError(f"kinds must be a non-empty sequence of {_PRUNABLE_KINDS} (the groups compact() "
                          f"removes), got {kinds!r}")
    if scope not in ("layer", "global"):
        raise ConfigError(f"scope must be 'layer' (the same fraction per layer) or 'global' "
                          f"(one ranking by norm / sqrt(size)), got {scope!r}")


def _is_number(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _families(groups: Sequence[Group]) -> list[tuple[Family, Tensor]]:
    """``(family, member indices)`` in order: the order of the rows of :func:`_scores` and of ``drop``."""
    return list(families_of(list(groups)).items())


@torch.no_grad()
def _scores(groups: Sequence[Group], scope: Scope) -> tuple[Tensor, Tensor]:
    """``(scores, family_ids)``, both ``(G,)`` in :func:`_families` order: the ranking key and the layer.

    ``layer``: ``||w_g||_2``; ``global``: ``||w_g||_2 / sqrt(|g|)``. ``family_ids`` number families from 0.
    """
    scores, family_ids = [], []
    for f, (fam, members) in enumerate(_families(groups)):
        norm = fam.row_sq().sqrt().cpu()[members]  # (members,)
        scores.append(norm / math.sqrt(fam.numel_per_member()) if scope == "global" else norm)
        family_ids.append(torch.full((len(members),), f, dtype=torch.long))
    return torch.cat(scores).float(), torch.cat(family_ids)


def _select(scores: Tensor, family_ids: Tensor, amount: float, scope: Scope) -> Tensor:
    """Which groups to zero, a bool ``(G,)``: the lowest scores, per family or overall, one kept per family."""
    drop = torch.zeros(len(scores), dtype=torch.bool)
    sizes = torch.bincount(family_ids)
    if scope == "layer":
        for f, n in enumerate(sizes.tolist()):
            members = torch.nonzero(family_ids == f).flatten()
            k = min(math.floor(amount * n + _EPS), n - 1)
            drop[members[torch.argsort(scores[members], stable=True)[:k]]] = True
        return drop
    k = min(math.floor(amount * len(scores) + _EPS), len(scores) - len(sizes))
    left, dropped = sizes.tolist(), 0
    for i in torch.argsort(scores, stable=True).tolist():
        if dropped == k:
            break
        f = int(family_ids[i])
        if left[f] > 1:  # never a family's last member
            drop[i], left[f], dropped = True, left[f] - 1, dropped + 1
    return drop


def _steps(family_ids: Tensor, scope: Scope) -> list[float]:
    """The amounts, ascending from 0, at which one more group goes (the step function's breakpoints)."""
    sizes = torch.bincount(family_ids).tolist()
    if scope == "layer":
        return sorted({j / n for n in sizes for j in range(n)})
    total = len(family_ids)
    return [j / total for j in range(total - len(sizes) + 1)]


def _pruned(model: nn.Module, inputs: tuple[Tensor, ...], kinds: Sequence[str], drop: Tensor) -> nn.Module:
    """``compact`` of a copy of ``model`` with the groups ``drop`` (bool ``(G,)``) zeroed."""
    sparse = copy.deepcopy(model)
    families = _families(structures(sparse, inputs, kinds=tuple(kinds)))  # the copy's, in the same order
    found = sum(len(members) for _, members in families)
    if found != len(drop):  # a bug, not a user error: tracing a copy must give the same groups
        raise RuntimeError(f"the copy of the model has {found} groups, the model {len(drop)}")
    start = 0
    for fam, members in families:
        chosen = members[drop[start:start + len(members)]]
        start += len(members)
        if len(chosen):
            fam.zero_members_(chosen)
    return compact(sparse, inputs)


def _macs(model: nn.Module, inputs: tuple[Tensor, ...]) -> int:
    return count_macs(model, inputs)


def _search(
    model: nn.Module, inputs: tuple[Tensor, ...], kinds: Sequence[str], scores: Tensor, family_ids: Tensor,
    scope: Scope, target: float,
) -> nn.Module:
    """The compact model of the smallest step whose MACs are ``<= target`` (MACs fall as steps rise)."""
    steps = _steps(family_ids, scope)

    def at(i: int) -> tuple[nn.Module, int]:
        small = _pruned(model, inputs, kinds, _select(scores, family_ids, steps[i], scope))
        return small, _macs(small, inputs)

    best, best_macs = at(len(steps) - 1)
    if best_macs > target:
        raise ConfigError(f"target_macs={target:,.0f} is below {best_macs:,} multiply-adds, what pruning every "
                          f"layer down to one {'/'.join(kinds)} reaches; raise it, or add kinds")
    lo, hi = -1, len(steps) - 1  # invariant: steps[hi] meets the target; steps[lo] does not (lo = -1: none tried)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        small, macs = at(mid)
        if macs <= target:
            hi, best, best_macs = mid, small, macs
        else:
            lo = mid
    log.info("magnitude_prune: amount %.4f (%s scope) gives %d MACs/sample for target %d",
             steps[hi], scope, best_macs, target)
    return best
