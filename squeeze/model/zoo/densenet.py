"""DenseNet-121 (Huang et al. 2017, Table 1): DenseNet-BC, every layer sees all earlier outputs."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["densenet121"]


def _bn_relu_conv(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """Pre-activation ordering used throughout DenseNet."""
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
    )


class _DenseBlock(nn.Module):
    def __init__(self, c_in: int, n_layers: int, growth: int, bn_size: int) -> None:
        super().__init__()
        # Layer i maps the concat of everything so far (c_in + i*growth channels) to `growth` new ones,
        # through a 1x1 bottleneck of bn_size*growth channels.
        self.layers = nn.ModuleList(
            nn.Sequential(
                _bn_relu_conv(c_in + i * growth, bn_size * growth, 1),
                _bn_relu_conv(bn_size * growth, growth, 3),
            )
            for i in range(n_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)  # (B, c_in + n_layers*growth, H, W)


class _DenseNet(nn.Module):
    def __init__(
        self, block_sizes: tuple[int, ...], growth: int, bn_size: int, compression: float,
        num_classes: int,
    ) -> None:
        super().__init__()
        c = 2 * growth
        layers = [
            nn.Conv2d(3, c, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        for i, n_layers in enumerate(block_sizes):
            layers.append(_DenseBlock(c, n_layers, growth, bn_size))
            c += n_layers * growth
            if i < len(block_sizes) - 1:  # transition: compress channels, halve resolution
                c_next = int(c * compression)
                layers += [_bn_relu_conv(c, c_next, 1), nn.AvgPool2d(2, stride=2)]
                c = c_next
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)  # (B, 1024, H/32, W/32) for DenseNet-121
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def densenet121(num_classes: int = 1000, growth: int = 32) -> nn.Module:
    return _DenseNet((6, 12, 24, 16), growth, bn_size=4, compression=0.5, num_classes=num_classes)
