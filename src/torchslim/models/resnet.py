"""CIFAR-style ResNets (He et al. 2016, §4.2): depth 6n+2, three stages of n BasicBlocks, widths 16/32/64."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchslim.errors import ConfigError


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is ``nn.Identity()`` when the shape is kept, else a projection
    ``Sequential(Conv2d 1x1 stride s, BatchNorm2d)`` (the paper's option B).
    Shapes: ``(N, in_channels, H, W) → (N, out_channels, H/stride, W/stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, C_in, H, W)`` → ``(N, C_out, H', W')``."""
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """conv1-bn1-relu stem, ``layer1..3`` of ``n = (depth - 2) / 6`` blocks, global average pool, ``fc``.

    Stages 2 and 3 halve the resolution: a 28×28 input gives 28 → 14 → 7 before pooling.

    Args:
        depth: ``6n + 2`` layers with weights (20, 32, 44, 56, 110, ...).
        num_classes: outputs of ``fc``.
        in_channels: input image channels (1 for Fashion-MNIST, 3 for CIFAR).
        widths: channels of the three stages.
    Raises:
        ConfigError: a depth that is not ``6n + 2`` with ``n >= 1``.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ConfigError(f"ResNet depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._stage(widths[0], widths[0], blocks, stride=1)
        self.layer2 = self._stage(widths[0], widths[1], blocks, stride=2)
        self.layer3 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self._init_weights()

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, C, H, W)`` → logits ``(N, num_classes)``."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)                   # (N, widths[2])
        return self.fc(x)
