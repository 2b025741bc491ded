"""A model that fails on the example inputs raises ShapeMismatch naming the node, and prints nothing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from torchslim import ShapeMismatch, structures
from torchslim.structure.capture import capture


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.fc(x).relu())


def test_shape_mismatch_names_the_node_without_a_traceback_on_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ShapeMismatch, match=r"shape \[\(2, 5\)\] at node 'fc'.*\(2x5 and 4x3\)") as err:
        structures(TwoLinear(), torch.randn(2, 5))
    assert "meta=" not in str(err.value)  # fx's ShapeProp put the node's whole metadata in its message
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""


def test_shapes_are_still_recorded_for_every_tensor_node() -> None:
    gm = capture(TwoLinear(), (torch.randn(2, 4),))
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes}
    assert shapes == {"x": (2, 4), "fc": (2, 3), "relu": (2, 3), "out": (2, 2), "output": (2, 2)}
    assert len(structures(TwoLinear(), torch.randn(2, 4))) == 3  # fc's 3 neurons
