"""verify: the tolerance rule, shape checks, and the deprecated ``inputs=`` keyword."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchslim import ShapeMismatch, VerifyReport, compact, verify
from torchslim.surgery.compact import verify as verify_from_compact


def _pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.bias[0] += 0.5  # output 0 moves by exactly 0.5
    return a, b, torch.randn(4, 3)


def test_the_difference_is_measured_against_the_tolerance():
    a, b, x = _pair()
    report = verify(a, b, x)
    assert report.max_abs_diff == pytest.approx(0.5) and not report.ok
    assert verify(a, a, x).ok and verify(a, b, x, atol=1.0).ok


def test_outputs_of_different_shapes_are_a_shape_mismatch():
    with pytest.raises(ShapeMismatch):
        verify(nn.Linear(3, 2), nn.Linear(3, 4), torch.randn(1, 3))


def test_the_old_inputs_keyword_warns_and_gives_the_same_report():
    a, b, x = _pair()
    with pytest.warns(DeprecationWarning, match="example_inputs"):
        old = verify(a, b, inputs=x)
    assert isinstance(old, VerifyReport) and old == verify(a, b, example_inputs=x) == verify(a, b, x)
    with pytest.raises(TypeError, match="only 'example_inputs'"):
        verify(a, b, inputs=x, example_inputs=x)


def test_compact_module_still_exports_verify():
    assert verify_from_compact is verify


def test_each_module_keeps_its_own_training_flag():
    """A training model around a frozen BatchNorm: verify and compact run it in eval, then restore each flag."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
    model[1].eval()
    x = torch.randn(2, 3, 4, 4)
    assert verify(model, model, x).ok
    assert model.training and not model[1].training
    compact(model, x)
    assert [m.training for m in model] == [True, False, True, True]
