"""MobileNetV1 (Howard et al. 2017, Table 1): a 3x3 stem conv, then 13 depthwise-separable blocks.

At width 1.0 and 224x224: 568.7 M MACs, 4.21 M conv and fc weights (4.23 M parameters with the BatchNorms).
"""

from __future__ import annotations

import torch
from torch import nn

from squeeze.model.zoo.blocks import conv_bn_act

__all__ = ["mobilenet_v1"]

# (output channels, stride) of each depthwise-separable block, after the 32-channel stride-2 stem.
_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
           (512, 1), (1024, 2), (1024, 1))


class _MobileNetV1(nn.Module):
    def __init__(self, num_classes: int, width_mult: float) -> None:
        super().__init__()
        c_in = int(32 * width_mult)
        layers = [conv_bn_act(3, c_in, 3, stride=2)]
        for c, s in _BLOCKS:
            c_out = int(c * width_mult)
            layers += [conv_bn_act(c_in, c_in, 3, s, groups=c_in), conv_bn_act(c_in, c_out, 1)]  # depthwise, pointwise
            c_in = c_out
        self.features = nn.Sequential(*layers)  # (B, c_in, H/32, W/32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v1(num_classes: int = 1000, width_mult: float = 1.0) -> nn.Module:
    return _MobileNetV1(num_classes, width_mult)
