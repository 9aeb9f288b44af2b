"""digits-cnn: a small residual CNN for the built-in 16x16 digits, trained on first use."""

from __future__ import annotations

import torch
from torch import nn

from squeeze.model.zoo.blocks import conv_bn_act

__all__ = ["digits_cnn"]


class _DigitsCNN(nn.Module):
    def __init__(self, num_classes: int, width: float) -> None:
        super().__init__()
        c16, c32, c64, c128 = (max(1, round(c * width)) for c in (16, 32, 64, 128))
        self.conv1 = conv_bn_act(1, c16, 3)
        self.conv2 = conv_bn_act(c16, c32, 3)
        self.pool1 = nn.MaxPool2d(2)  # 16x16 -> 8x8
        self.conv3 = conv_bn_act(c32, c64, 3)
        # conv3 and conv4 outputs are summed, so their output channels are coupled for pruning.
        self.conv4 = conv_bn_act(c64, c64, 3)
        self.pool2 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv5 = conv_bn_act(c64, c128, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv2(self.conv1(x)))
        x = self.conv3(x)
        x = self.pool2(x + self.conv4(x))
        return self.fc(torch.flatten(self.pool(self.conv5(x)), 1))


def digits_cnn(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return _DigitsCNN(num_classes, width)
