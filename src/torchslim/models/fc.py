"""An FC-heavy classifier for communication benchmarks: AlexNet's classifier (fc6-fc7-fc8) on flat images.

TernGrad pays off most where gradients are large and compute is small, i.e. on fully connected layers
(the paper's AlexNet and VGG gains come from fc6/fc7). ``fcnet`` puts AlexNet's 4096-4096 classifier on
flattened 28×28 images: 20,037,642 parameters, 99.8% of them in the two hidden layers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchslim.errors import ConfigError
from torchslim.models.registry import register_model

__all__ = ["FCNet", "fcnet"]


class FCNet(nn.Module):
    """flatten → fc1 → relu1 → drop1 → fc2 → relu2 → drop2 → fc3, as AlexNet's fc6/fc7/fc8.

    Shapes: ``(N, C, H, W) → (N, C·H·W) → (N, hidden[0]) → (N, hidden[1]) → (N, num_classes)``.
    AlexNet puts its dropout before fc6 and fc7; here it follows the ReLUs of fc1 and fc2, which drops
    the same activations (the inputs of fc2 and fc3) without dropping raw pixels.

    Args:
        num_classes: outputs of ``fc3``.
        in_channels, input_size: the image shape ``(in_channels, input_size, input_size)``,
            flattened to ``in_channels * input_size**2`` inputs (784 for 28×28 grey images).
        hidden: widths of the two hidden layers (AlexNet: 4096, 4096).
        dropout: drop probability after each hidden ReLU (AlexNet: 0.5).
    Raises:
        ConfigError: ``hidden`` not of length 2, or ``dropout`` outside ``[0, 1)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 28,
        hidden: tuple[int, int] = (4096, 4096),
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if len(hidden) != 2:
            raise ConfigError(f"hidden must give the widths of exactly two layers, e.g. (4096, 4096); got {hidden!r}")
        if not 0 <= dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout!r}")
        width1, width2 = hidden
        self.fc1 = nn.Linear(in_channels * input_size * input_size, width1)
        self.relu1 = nn.ReLU()
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width1, width2)
        self.relu2 = nn.ReLU()
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(width2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, C, H, W)`` → logits ``(N, num_classes)``."""
        x = torch.flatten(x, 1)                                 # (N, C*H*W)
        x = self.drop1(self.relu1(self.fc1(x)))                 # (N, hidden[0])
        x = self.drop2(self.relu2(self.fc2(x)))                 # (N, hidden[1])
        return self.fc3(x)


@register_model("fcnet")
def fcnet(
    num_classes: int = 10,
    in_channels: int = 1,
    input_size: int = 28,
    hidden: tuple[int, int] = (4096, 4096),
    dropout: float = 0.5,
) -> FCNet:
    """784-4096-4096-10 with ReLU and dropout 0.5: AlexNet's classifier, 20.0M parameters."""
    return FCNet(num_classes, in_channels, input_size, tuple(hidden), dropout)
