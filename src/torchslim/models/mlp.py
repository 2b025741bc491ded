"""A fully connected classifier: LeNet-300-100's shape with SSL's 500-300 hidden layers by default."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchslim.errors import ConfigError


class MLP(nn.Module):
    """flatten → fc1 → relu1 → fc2 → relu2 → fc3: ``(N, C, H, W) → (N, C*H*W) → ... → (N, num_classes)``.

    Args:
        num_classes: outputs of ``fc3``.
        in_channels, input_size: the image shape ``(in_channels, input_size, input_size)``,
            flattened to ``in_channels * input_size**2`` inputs (784 for 28×28 grey images).
        hidden: widths of the two hidden layers.
    Raises:
        ConfigError: ``hidden`` not of length 2.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        hidden: tuple[int, int] = (500, 300),
    ) -> None:
        super().__init__()
        if len(hidden) != 2:
            raise ConfigError(f"hidden must give the widths of exactly two layers, e.g. (500, 300); got {hidden!r}")
        width1, width2 = hidden
        self.fc1 = nn.Linear(in_channels * input_size * input_size, width1)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(width1, width2)
        self.relu2 = nn.ReLU()
        self.fc3 = nn.Linear(width2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, C, H, W)`` → logits ``(N, num_classes)``."""
        x = torch.flatten(x, 1)                                 # (N, C*H*W)
        x = self.relu1(self.fc1(x))
        return self.fc3(self.relu2(self.fc2(x)))
