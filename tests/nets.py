"""Small models written for the tests: each exercises one way channels flow."""

from __future__ import annotations

import torch
from torch import nn


class TinyLeNet(nn.Module):
    """Caffe's LeNet shape (no ReLU after the convs), narrower."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.pool1 = nn.Conv2d(1, 6, 5), nn.MaxPool2d(2)
        self.conv2, self.pool2 = nn.Conv2d(6, 8, 5), nn.MaxPool2d(2)
        self.fc1, self.relu, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool2(self.conv2(self.pool1(self.conv1(x))))
        return self.fc2(self.relu(self.fc1(torch.flatten(x, 1))))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8, 8), Block(8, 8))
        self.layer2 = nn.Sequential(Block(8, 12, 2), Block(12, 12))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.pool(x).view(x.size(0), -1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(),
                                 nn.Linear(30, 5))

    def forward(self, x):
        return self.net(x)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial statistics so eval mode is a real test."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model
