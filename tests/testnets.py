"""Small models for tests, importable as `testnets:<factory>` (tests/ is on sys.path under pytest)."""

import os

import torch
from torch import nn


def tiny_cnn(width: int = 8, num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
    ).eval()


def conv_stack(layers: int = 2, channels: int = 32) -> nn.Module:
    """Cost grows linearly with `layers`: conv_stack(8) is clearly slower than conv_stack(1)."""
    torch.manual_seed(0)
    blocks = [nn.Conv2d(3, channels, 3, padding=1), nn.ReLU()]
    for _ in range(layers - 1):
        blocks += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 4)).eval()


class Noisy(nn.Module):
    """Adds fresh random noise: its ONNX export cannot match torch, so parity must fail."""

    def forward(self, x):
        return x + torch.rand_like(x)


def noisy() -> nn.Module:
    return Noisy()


class Booby(nn.Module):
    """A module whose unpickling creates the file named in $SQUEEZE_TEST_CANARY (stands for any code)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)

    def __setstate__(self, state):
        canary = os.environ.get("SQUEEZE_TEST_CANARY")
        if canary:
            open(canary, "w").close()
        super().__setstate__(state)
