"""Force Regularization (Wen et al. 2017): attract the normalized filters of each layer to one another.

Filters whose directions coordinate span a lower-rank space, so a low-rank approximation after training
loses less. The paper's update is ``W_i ← W_i − η(∂E/∂W_i − λ_s·ΔW_i)`` with
``ΔW_i = ||W_i|| Σ_j (f_ji − (f_jiᵀw_i) w_i)``, ``w_i = W_i/||W_i||``, and the force ``f_ji``:

* ``"l2"`` (Caffe ``force_type: "Degradation"``): ``f_ji = w_j − w_i``, weaker as filters get closer;
* ``"l1"`` (Caffe ``"Constant"``): ``f_ji = (w_j − w_i)/||w_j − w_i||``, unit strength.

As in the authors' code, filters with ``||W_i|| ≤ 1e-4`` neither pull nor get pulled, and ``"l1"`` skips
pairs with ``D_ij = ||w_j − w_i|| ≤ 1e-4``, taking ``D_ij = sqrt(2 − 2w_iᵀw_j)`` from a Gram matrix
(float32 resolves it only to about 5e-4, so coincident filters there get a tiny, finite pull). ``"l2"``
needs no pair skip (such a pair pulls by ≤ 1e-4) and costs O(N·d); ``"l1"`` costs O(N²·d).
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from torchslim._select import check_patterns, matches, selected
from torchslim.errors import ConfigError, UnsupportedOperation

__all__ = ["ForceRegularizer", "force", "force_penalty"]

Kind = Literal["l2", "l1"]
Layers = nn.Module | Mapping[str, nn.Module] | Iterable[tuple[str, nn.Module]]
KINDS: tuple[str, ...] = ("l2", "l1")
EPS = 1e-4  # the authors' threshold on ||W_i|| and on D_ij

logger = logging.getLogger(__name__)


def _unit(W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``w = W/||W||`` per row, ``(*, N, d)``; rows with ``||W|| ≤ EPS`` become 0. Also ``||W||`` and the mask."""
    sq = W.square().sum(-1, keepdim=True)  # (*, N, 1)
    valid = (sq > EPS**2).to(W.dtype)
    norm = sq.clamp_min(EPS**2).sqrt()  # clamped: no NaN gradient at a zero filter
    return W / norm * valid, norm, valid


def _pairs(w: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Distances ``D_ij`` and mask ``m_ij`` (both valid, ``i ≠ j``, ``D_ij > EPS``), each ``(*, N, N)``."""
    gram = w @ w.mT  # (*, N, N)
    d2 = (2 - 2 * gram).clamp_min(0)
    eye = torch.eye(w.shape[-2], dtype=torch.bool, device=w.device)
    mask = (valid * valid.mT).bool() & ~eye & (d2.detach() > EPS**2)
    dist = torch.where(mask, d2, torch.ones_like(d2)).sqrt() * mask  # safe sqrt: gradient 0 where masked
    return dist, mask


def _pull(w: Tensor, valid: Tensor, kind: Kind) -> Tensor:
    """``Σ_j f_ji`` up to a multiple of ``w_i`` (which the tangent projection removes), ``(*, N, d)``."""
    if kind == "l2":
        return valid * (valid * w).sum(-2, keepdim=True)  # S = Σ_j w_j; Σ_j (w_j − w_i) = S − N·w_i
    dist, mask = _pairs(w, valid)
    coef = torch.where(mask, dist.clamp_min(EPS).reciprocal(), torch.zeros_like(dist))  # m_ij / D_ij
    return coef @ w  # Σ_j (w_j − w_i)/D_ij = Σ_j w_j/D_ij − (Σ_j 1/D_ij)·w_i


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind must be 'l2' (force w_j − w_i) or 'l1' (unit force), got {kind!r}")


def force(W: Tensor, kind: Kind = "l2") -> Tensor:
    """The paper's ``ΔW_i = ||W_i|| Σ_j (f_ji − (f_jiᵀw_i) w_i)`` for every filter at once.

    Args:
        W: filters as rows, ``(*, N, d)``; leading dims are independent sets (conv groups).
        kind: ``"l2"`` or ``"l1"`` force (see the module docstring).
    Returns:
        ``ΔW``, ``(*, N, d)``, orthogonal to each ``w_i``. Subtract ``λ_s·ΔW`` from the gradient.
    """
    _check_kind(kind)
    w, norm, valid = _unit(W)
    pull = _pull(w, valid, kind)
    tangent = pull - (pull * w).sum(-1, keepdim=True) * w  # drop the component along w_i
    return norm * tangent


def force_penalty(W: Tensor, kind: Kind = "l2") -> Tensor:
    """Differentiable ``R`` with ``−∂R/∂W_i = (2/||W_i||²)·ΔW_i`` exactly (``ΔW`` from :func:`force`).

    ``"l2"``: ``R = ½ Σ_i Σ_j ||w_j − w_i||²``; ``"l1"``: ``R = Σ_i Σ_j ||w_j − w_i||``, over the same
    filters and pairs :func:`force` uses, summed over the leading dims ``*`` of ``W: (*, N, d)``; a 0-d
    tensor. The 2 is each pair counted twice; ``1/||W_i||²`` is the Jacobian of ``w_i = W_i/||W_i||``
    and the ``||W_i||`` in ``ΔW_i``. So descent on ``R`` turns each filter the way ``apply_`` does, but
    turns short filters faster.
    """
    _check_kind(kind)
    w, _, valid = _unit(W)
    if kind == "l1":
        return _pairs(w, valid)[0].sum()
    n = valid.sum(-2, keepdim=True)  # (*, 1, 1)
    mean = (valid * w).sum(-2, keepdim=True) / n.clamp_min(1)  # (*, 1, d)
    return (n * valid * (w - mean).square()).sum()  # ½ Σ_ij ||w_j − w_i||² = n Σ_i ||w_i − mean||²


def _filters(module: nn.Module) -> Tensor:
    """The weight as ``(groups, N/groups, d)``: forces act only within a conv group."""
    groups = getattr(module, "groups", 1)
    return module.weight.reshape(groups, module.weight.shape[0] // groups, -1)


def _layers(model_or_modules: Layers) -> dict[str, nn.Module]:
    """Name -> module: a model's Linear/Conv layers by module path, or the pairs given."""
    if isinstance(model_or_modules, nn.Module):
        return {n: m for n, m in model_or_modules.named_modules() if isinstance(m, (nn.Linear, _ConvNd))}
    pairs = model_or_modules.items() if isinstance(model_or_modules, Mapping) else model_or_modules
    return dict(pairs)


def _check_filters(name: str, m: nn.Module) -> None:
    """Only Linear and non-transposed conv weights hold one filter per row (dim 0)."""
    if not isinstance(m, (nn.Linear, _ConvNd)) or getattr(m, "transposed", False):
        raise UnsupportedOperation(
            f"layer '{name}' is {type(m).__name__}; force regularization needs Linear or Conv1d/2d/3d filters "
            f"(rows of the weight). Pass exclude=['{name}'] or leave it out of the modules you pass."
        )


def _nonnegative(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


def _multiplier(name: str, multipliers: Mapping[str, float]) -> float:
    """The longest key that matches ``name`` (``_select.matches``) wins; 1 when none matches."""
    keys = [k for k in multipliers if matches(k, name)]
    return float(multipliers[max(keys, key=len)]) if keys else 1.0


class ForceRegularizer:
    """The force of Wen et al. 2017 on every Conv/Linear layer's filters, scaled by ``λ_s``·multiplier.

    Call :meth:`apply_` after ``loss.backward()`` and before ``optimizer.step()`` (the authors add it
    after weight decay, before momentum); or add :meth:`penalty` to the loss instead (not both).

    Args:
        model_or_modules: a model (its Linear and Conv1d/2d/3d layers, named by module path), or a
            mapping / iterable of ``(name, module)``.
        strength: ``λ_s`` (the solver's ``force_decay``; the authors' LeNet used 1e-3 with ``"l1"``).
        kind: ``"l2"`` or ``"l1"`` force.
        multipliers: per-layer factors on ``λ_s`` (Caffe's ``force_mult``), keyed by layer as ``include``,
            the longest key winning; 0 disables a layer.
        include: the layers to regularize, as names, prefixes ending at ``.`` or globs (``"layer2"``,
            ``"*.conv1"``); ``None``, every layer found.
        exclude: layers to leave alone, by the same rule.
        adaptive: the authors' ``force_decay_type: "adaptive"``: each layer's force is rescaled to
            ``||λ_s·mult·ΔW|| = λ_s·mult·||∂E/∂W||``, so ``λ_s`` is a ratio to the data gradient, the
            same for wide and narrow layers and for any weight scale BatchNorm leaves free.
    Raises:
        ConfigError: a bad strength, kind or multiplier, or a key or pattern that selects no layer.
        UnsupportedOperation: a given module that is not Linear or a (non-transposed) Conv.

    Example:
        >>> import torch
        >>> from torchslim.regularize.force import ForceRegularizer
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(36, 2))
        >>> reg = ForceRegularizer(net, 1e-3, "l1", multipliers={"2": 0.5})
        >>> reg.layers
        {'0': 1.0, '2': 0.5}
        >>> net(torch.randn(1, 1, 5, 5)).sum().backward(); reg.apply_()
    """

    def __init__(
        self,
        model_or_modules: Layers,
        strength: float,
        kind: Kind = "l2",
        *,
        multipliers: Mapping[str, float] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
        adaptive: bool = False,
    ) -> None:
        _check_kind(kind)
        if not _nonnegative(strength):
            raise ConfigError(f"strength (λ_s) must be a finite number >= 0, got {strength!r}; pass 0 to disable")
        multipliers = dict(multipliers or {})
        bad = {k: v for k, v in multipliers.items() if not _nonnegative(v)}
        if bad:
            raise ConfigError(f"multipliers must be finite and >= 0 (0 disables a layer), got {bad}")
        found = _layers(model_or_modules)
        if not found:
            raise ConfigError("found no Linear or Conv layer to regularize")
        names = list(found)
        check_patterns(list(multipliers), names, "multiplier")
        check_patterns(include, names, "include")
        check_patterns(exclude, names, "exclude")
        self.strength, self.kind, self.adaptive = float(strength), kind, bool(adaptive)
        self.layers: dict[str, float] = {}  # name -> multiplier, for the layers the force acts on
        self._modules: dict[str, nn.Module] = {}
        for name, m in found.items():
            mult = _multiplier(name, multipliers)
            if mult > 0 and selected(name, include, exclude):
                _check_filters(name, m)
                self.layers[name], self._modules[name] = mult, m
        logger.info("force regularization (%s%s, λ_s=%g) on %d layers",
                    kind, ", adaptive" if adaptive else "", strength, len(self.layers))

    @torch.no_grad()
    def apply_(self) -> None:
        """``grad ← grad − λ_s·mult·ΔW`` on each layer's weight; weights without a gradient are skipped.

        Adaptive: ``ΔW`` is first scaled to the norm of ``grad`` (a layer whose force or gradient is 0
        is left as is).
        """
        if self.strength == 0:
            return
        for name, m in self._modules.items():
            grad = m.weight.grad
            if grad is not None:
                delta = force(_filters(m), self.kind).reshape(grad.shape).to(grad.dtype)
                scale = self.strength * self.layers[name]
                if self.adaptive:
                    # one fused ratio (no host sync): 0 where the force vanishes, not inf·0
                    d = delta.norm()
                    scale = scale * torch.where(d > 0, grad.norm() / d.clamp_min(torch.finfo(d.dtype).tiny), 0.0)
                grad.sub_(scale * delta)

    def penalty(self) -> Tensor:
        """``Σ_layers λ_s·mult·R`` (:func:`force_penalty`), a differentiable 0-d tensor.

        Raises:
            ConfigError: the regularizer is adaptive (its scale needs the data gradient: use ``apply_``).
        """
        if self.adaptive:
            raise ConfigError("an adaptive force is scaled by the data gradient, which the loss does not have "
                              "yet; call apply_() after backward() instead of adding penalty() to the loss")
        total: Tensor | None = None
        for name, m in self._modules.items():
            term = (self.strength * self.layers[name]) * force_penalty(_filters(m), self.kind)
            total = term if total is None else total.to(term.device) + term
        return total if total is not None else torch.zeros(())
