"""Check that two models compute the same function on an example batch: ``verify`` and its report."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from torchslim._deprecate import renamed_kwargs
from torchslim._inputs import Inputs, as_tuple, outputs
from torchslim.errors import ShapeMismatch

__all__ = ["VerifyReport", "verify"]


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
        atol: the tolerance for outputs within ±1.
    Returns:
        a :class:`VerifyReport`.
    Raises:
        ShapeMismatch: the models' outputs differ in number or shape.
    """
    inputs = as_tuple(example_inputs)
    ya, yb = outputs(a, inputs), outputs(b, inputs)
    if len(ya) != len(yb) or any(p.shape != q.shape for p, q in zip(ya, yb)):
        raise ShapeMismatch(
            f"outputs differ in shape: {[tuple(t.shape) for t in ya]} vs {[tuple(t.shape) for t in yb]}"
        )
    diff = max((float((p.float() - q.float()).abs().max()) for p, q in zip(ya, yb) if p.numel()), default=0.0)
    scale = max((float(p.float().abs().max()) for p in ya if p.numel()), default=0.0)
    tol = atol * max(1.0, scale)
    return VerifyReport(diff, scale, tol, diff <= tol)
