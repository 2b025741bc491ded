"""Check that two models compute the same function on an example batch: ``verify`` and its report."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from torchslim._deprecate import renamed_kwargs
from torchslim._inputs import Inputs, as_tuple, outputs
from torchslim.errors import DivergenceError, ShapeMismatch

__all__ = ["VerifyReport", "check_finite", "nonfinite_params", "verify"]


@dataclass(frozen=True)
class VerifyReport:
    """How far two models' outputs are apart on the same inputs (eval mode)."""

    max_abs_diff: float
    scale: float  # max |output| of the reference model
    tolerance: float
    ok: bool

    def __str__(self) -> str:
        verdict = "equal" if self.ok else "DIFFERENT"
        return (f"{verdict}: max |a - b| = {self.max_abs_diff:.3g} (output scale {self.scale:.3g}, "
                f"tolerance {self.tolerance:.3g})")


@renamed_kwargs(inputs="example_inputs")
def verify(a: nn.Module, b: nn.Module, example_inputs: Inputs, *, atol: float = 1e-5) -> VerifyReport:
    """Compare ``a(*example_inputs)`` with ``b(*example_inputs)`` in eval mode.

    ``ok`` when ``max |a − b| ≤ atol · max(1, max |a|)``: absolute for outputs within ±1, relative to
    the output's scale beyond (float sums of fewer terms round differently).

    Args:
        a: the reference model (its outputs set the scale).
        b: the model to check, e.g. ``compact(a, example_inputs)``.
        example_inputs: a tensor or a sequence of tensors both models accept, e.g. ``(B, 1, 28, 28)``.
            (``inputs=`` is the deprecated name.)
        atol: the tolerance for outputs within ±1; float16 and bfloat16 outputs get at least
            ``16·eps`` of their dtype (``1.6e-2``, ``0.125``): each layer rounds to about ``eps``.
    Returns:
        a :class:`VerifyReport`.
    Raises:
        ShapeMismatch: the models' outputs differ in number or shape.
        DivergenceError: a model has NaN or infinite parameters, so no comparison means anything.
    """
    check_finite(a, "the reference model")
    check_finite(b, "the model to check")
    inputs = as_tuple(example_inputs)
    ya, yb = outputs(a, inputs), outputs(b, inputs)
    if len(ya) != len(yb) or any(p.shape != q.shape for p, q in zip(ya, yb)):
        raise ShapeMismatch(
            f"outputs differ in shape: {[tuple(t.shape) for t in ya]} vs {[tuple(t.shape) for t in yb]}"
        )
    diff = max((float((p.float() - q.float()).abs().max()) for p, q in zip(ya, yb) if p.numel()), default=0.0)
    scale = max((float(p.float().abs().max()) for p in ya if p.numel()), default=0.0)
    tol = max([atol, *(_ROUNDING_EPS * torch.finfo(p.dtype).eps for p in ya if _low_precision(p))]) * max(1.0, scale)
    return VerifyReport(diff, scale, tol, diff <= tol)


_ROUNDING_EPS = 16  # float16 models: compacted and original differ by ~1 eps (ResNet-20, ViT); 16x for deeper ones


def _low_precision(t: torch.Tensor) -> bool:
    """float16 or bfloat16: a few significant digits, so sums of fewer terms round visibly differently."""
    return t.is_floating_point() and torch.finfo(t.dtype).bits < 32


@torch.no_grad()
def nonfinite_params(model: nn.Module) -> list[str]:
    """Names of ``model``'s floating-point parameters that hold a NaN or an infinity (buffers are not read: a
    causal mask of ``-inf`` is a model's design, not a divergence)."""
    return [name for name, p in model.named_parameters() if p.is_floating_point() and not bool(p.isfinite().all())]


def check_finite(model: nn.Module, what: str = "the model") -> None:
    """Raise :class:`DivergenceError` if ``model`` has NaN or infinite weights (the training that made it diverged).

    Raises:
        DivergenceError: naming the first few such parameters.
    """
    bad = nonfinite_params(model)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise DivergenceError(
            f"{what} has NaN or infinite weights ({', '.join(bad[:5])}{more}): the training that produced it "
            "diverged. Use a checkpoint from before that (with a run's --resume, its last checkpoint.pt is finite), "
            "or retrain with a lower learning rate or gradient clipping.")
