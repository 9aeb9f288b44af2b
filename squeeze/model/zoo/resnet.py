"""ResNet-18 and ResNet-50 (He et al. 2016, Table 1): BasicBlock x [2, 2, 2, 2], Bottleneck x [3, 4, 6, 3]
(the stride on the 3x3 conv, as torchvision's)."""

from __future__ import annotations

import torch
from torch import nn

from squeeze.model.zoo.blocks import conv_bn_act

__all__ = ["resnet18", "resnet50"]


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = conv_bn_act(c_in, c_out, 3, stride)
        self.conv2 = conv_bn_act(c_out, c_out, 3, act=None)
        # Projection shortcut whenever the shape changes, identity otherwise.
        self.downsample = (
            conv_bn_act(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out else None
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + shortcut)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = conv_bn_act(c_in, width, 1)
        self.conv2 = conv_bn_act(width, width, 3, stride)
        self.conv3 = conv_bn_act(width, c_out, 1, act=None)
        self.downsample = (
            conv_bn_act(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out else None
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + shortcut)


class _ResNet(nn.Module):
    def __init__(self, blocks_per_stage: list[int], num_classes: int, block=_BasicBlock) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv_bn_act(3, 64, 7, stride=2), nn.MaxPool2d(3, stride=2, padding=1)
        )  # (B, 64, H/4, W/4)
        stages, c_in = [], 64
        grow = getattr(block, "expansion", 1)
        for i, n_blocks in enumerate(blocks_per_stage):
            width = 64 * 2**i
            c_out = width * grow
            stride = 1 if i == 0 else 2
            blocks = [block(c_in, width, stride)]
            blocks += [block(c_out, width, 1) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)  # (B, 512, H/32, W/32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def resnet18(num_classes: int = 1000) -> nn.Module:
    return _ResNet([2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> nn.Module:
    return _ResNet([3, 4, 6, 3], num_classes, _Bottleneck)
