"""float16 and bfloat16 models compact in their own dtype, checked with a tolerance their rounding allows;
where the check still fails, the error says to convert with model.float(), never "please report"."""

from __future__ import annotations

import pytest
import torch
from nets import TinyLeNet

from torchslim import UnsupportedOperation, compact, structures, verify
from torchslim.surgery import verify as verify_module

DTYPES = [torch.float16, torch.bfloat16]


def _sparse_lenet(dtype: torch.dtype) -> tuple[TinyLeNet, torch.Tensor]:
    """TinyLeNet in ``dtype`` with every third channel and every other kernel column zero (LoweredConv2d's case)."""
    torch.manual_seed(0)
    model = TinyLeNet().eval().to(dtype)
    x = torch.randn(4, 1, 28, 28).to(dtype)
    for i, g in enumerate(structures(model, x)):
        if i % 3 == 0:
            g.zero_()
    for g in structures(model, x, kinds=("shape",))[::2]:
        g.zero_()
    return model, x


@pytest.mark.parametrize("dtype", DTYPES)
def test_low_precision_model_compacts_in_its_own_dtype(dtype: torch.dtype) -> None:
    model, x = _sparse_lenet(dtype)
    small = compact(model, x, shapes="lowered")
    assert {p.dtype for p in small.parameters()} == {dtype}
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    report = verify(model, small, x)
    assert report.ok and report.max_abs_diff > 0  # the lowered convs round differently, within the tolerance


@pytest.mark.parametrize("dtype", DTYPES)
def test_verify_allows_sixteen_eps_of_the_output_dtype(dtype: torch.dtype) -> None:
    model, x = _sparse_lenet(dtype)
    report = verify(model, model, x, atol=1e-5)
    assert report.tolerance == pytest.approx(16 * torch.finfo(dtype).eps * max(1.0, report.scale))
    assert verify(model.float(), model.float(), x.float()).tolerance == pytest.approx(1e-5 * max(1.0, report.scale),
                                                                                     rel=0.01)


def test_float16_that_fails_the_check_is_refused_without_please_report(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "_ROUNDING_EPS", 0)  # float32's tolerance: the lowered convs' rounding fails it
    model, x = _sparse_lenet(torch.float16)
    with pytest.raises(UnsupportedOperation, match=r"float16 is not supported; convert with model\.float\(\)") as err:
        compact(model, x, shapes="lowered")
    assert "please report" not in str(err.value)
