"""fashion-cnn: a small residual CNN for 28x28 Fashion-MNIST, trained on first use."""

from __future__ import annotations

import torch
from torch import nn

from squeeze.model.zoo.blocks import conv_bn_act

__all__ = ["fashion_cnn"]


class _ResidualBlock(nn.Module):
    """Two 3x3 conv-BN at constant width, added to the input: the block's input and output channels are coupled."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(channels, channels, 3)
        self.conv2 = conv_bn_act(channels, channels, 3, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


class _FashionCNN(nn.Module):
    def __init__(self, num_classes: int, width: float) -> None:
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (32, 64, 128))
        # Strided from the first conv: layers at full resolution would cost most of a 2-core training budget.
        self.stem = conv_bn_act(1, c1, 3, stride=2)  # 28x28 -> 14x14
        self.down2 = conv_bn_act(c1, c2, 3, stride=2)  # -> 7x7
        self.stage2 = _ResidualBlock(c2)
        self.down3 = conv_bn_act(c2, c3, 3, stride=2)  # -> 4x4
        self.stage3 = _ResidualBlock(c3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down2(self.stem(x)))
        return self.fc(torch.flatten(self.pool(self.stage3(self.down3(x))), 1))


def fashion_cnn(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return _FashionCNN(num_classes, width)
