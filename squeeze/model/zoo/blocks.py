"""The building block the zoo's architectures share."""

from __future__ import annotations

from torch import nn

__all__ = ["conv_bn_act"]


def conv_bn_act(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act=nn.ReLU):
    """conv (no bias, BN follows) -> BN -> activation; `act=None` leaves the output linear."""
    layers = [
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)
