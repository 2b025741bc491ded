"""Caffe's LeNet, as trained in the SSL paper (Wen et al. 2016): no nonlinearity after the convolutions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchslim.errors import ConfigError


class LeNet(nn.Module):
    """conv1 (20, 5x5) → pool → conv2 (50, 5x5) → pool → fc1 (500) → ReLU → fc2.

    Caffe's ``lenet_train_test.prototxt`` has a ReLU only between the two fully connected layers;
    this model keeps that. On 28×28 inputs: ``(N, 1, 28, 28) → (N, 20, 12, 12) → (N, 50, 4, 4)
    → (N, 800) → (N, 500) → (N, num_classes)``; 431,080 parameters for 10 classes.

    Args:
        num_classes: outputs of ``fc2``.
        in_channels: input image channels.
        input_size: input height = width, which fixes ``fc1``'s inputs ``50 * s * s`` with
            ``s = ((input_size - 4) // 2 - 4) // 2``.
    Raises:
        ConfigError: ``input_size < 16``, too small for two 5x5 convolutions and two 2x2 pools.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        side = ((input_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ConfigError(f"LeNet needs inputs of at least 16x16 pixels, got input_size={input_size}")
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, C, H, W)`` → logits ``(N, num_classes)``."""
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = torch.flatten(x, 1)                                 # (N, 50 * s * s)
        return self.fc2(self.relu(self.fc1(x)))
