"""A model that draws random numbers in eval mode gets its own error from compact(), not "please report"."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import NondeterministicModel, VerificationError, compact, structures


class AlwaysDropout(nn.Module):
    """Dropout that ignores eval mode: two calls on one input differ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(F.dropout(F.relu(self.conv1(x)), 0.5, training=True))


def test_compact_names_a_nondeterministic_model():
    model, x = AlwaysDropout().eval(), torch.randn(2, 3, 12, 12)
    for g in structures(model, x)[:3]:
        g.zero_()
    with pytest.raises(NondeterministicModel, match="differ between two calls on the same input") as caught:
        compact(model, x)
    assert isinstance(caught.value, VerificationError)  # callers catching the old error still do
    assert "please report" not in str(caught.value)


def test_a_deterministic_model_still_compacts():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 12, 12)
    for g in structures(model, x)[:3]:
        g.zero_()
    small = compact(model, x)
    torch.testing.assert_close(small(x), model(x))
    assert small[0].out_channels == 5
