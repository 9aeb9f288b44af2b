"""r3d-small: a small R3D-style 3D ResNet (Tran et al., CVPR 2018: 3x3x3 convs throughout) for fashion-motion clips
(1 x 8 x 32 x 32, 8 motion directions), trained on first use. The stem keeps time and halves space; the two
strided stages halve both, so a temporal scale in a later layer has frames left to lose."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["r3d_small"]


def _conv_bn(c_in: int, c_out: int, stride=1, act: bool = True) -> nn.Sequential:
    """3x3x3 conv (no bias, BN follows) -> BatchNorm3d -> optional ReLU."""
    layers = [nn.Conv3d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm3d(c_out)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if act else nn.Sequential(*layers)


class _Block(nn.Module):
    """R3D's basic block: two 3x3x3 conv-BN and a residual add; a strided 1x1x1 projection where the shape changes
    (its output channels are coupled with the block's)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, stride)
        self.conv2 = _conv_bn(c_out, c_out, act=False)
        self.downsample = (nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm3d(c_out))
                           if stride != 1 or c_in != c_out else None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class _R3DSmall(nn.Module):
    def __init__(self, num_classes: int, width: float) -> None:
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (8, 16, 32))
        self.stem = _conv_bn(1, c1, (1, 2, 2))  # 8x32x32 -> 8x16x16
        self.stage1 = _Block(c1, c1, 1)
        self.stage2 = _Block(c1, c2, 2)  # -> 4x8x8
        self.stage3 = _Block(c2, c3, 2)  # -> 2x4x4
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def r3d_small(num_classes: int = 8, width: float = 1.0) -> nn.Module:
    return _R3DSmall(num_classes, width)
