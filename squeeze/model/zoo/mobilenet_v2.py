"""MobileNetV2 (Sandler et al. 2018, Table 2): inverted residuals, linear bottlenecks."""

from __future__ import annotations

import torch
from torch import nn

from squeeze.model.zoo.blocks import conv_bn_act

__all__ = ["mobilenet_v2"]


def _make_divisible(channels: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, never dropping more than 10 % below `channels`."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = int(round(c_in * expansion))
        layers = [] if expansion == 1 else [conv_bn_act(c_in, hidden, 1, act=nn.ReLU6)]
        layers += [
            conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
            conv_bn_act(hidden, c_out, 1, act=None),  # linear bottleneck
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


# (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2.
_MOBILENET_V2_STAGES = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class _MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, width_mult: float, dropout: float) -> None:
        super().__init__()
        c_in = _make_divisible(32 * width_mult)
        # The last conv is not thinned below 1280 for width < 1 (paper, section 5.1).
        c_last = _make_divisible(1280 * max(1.0, width_mult))
        layers = [conv_bn_act(3, c_in, 3, stride=2, act=nn.ReLU6)]
        for t, c, n, s in _MOBILENET_V2_STAGES:
            c_out = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(_InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        layers.append(conv_bn_act(c_in, c_last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)  # (B, c_last, H/32, W/32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Module:
    return _MobileNetV2(num_classes, width_mult, dropout)
