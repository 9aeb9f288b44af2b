"""Built-in models: indexed once by name in squeeze.zoo_index (listed by `squeeze list` without torch), created
by `create_model`.

Every factory is a top-level function of this module, so `squeeze.zoo:<function>` is an importable
architecture reference (`ZooEntry.arch_ref`). Architectures follow the papers' tables; the parameter
counts match the usual reference implementations exactly (checked in tests/test_zoo.py).
"""

from __future__ import annotations

import hashlib
import logging
import io
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from squeeze.util.cache import atomic_write_bytes, cache_dir
from squeeze.errors import first_line
from squeeze.train import train_classifier
from squeeze.zoo_index import ZooEntry, get_entry, list_models, model_registry, register_model

__all__ = [
    "ZooEntry",
    "model_registry",
    "register_model",
    "list_models",
    "get_entry",
    "create_model",
    "resnet18",
    "mobilenet_v2",
    "densenet121",
    "digits_cnn",
    "fashion_cnn",
]


def create_model(name: str, *, trained: bool = True, **kwargs) -> nn.Module:
    """Build a zoo model in eval mode; a `trained` entry comes with its trained weights (trained on first use)
    unless `trained=False`, which gives any entry's architecture at its seeded init (enough for shapes,
    parameters and MACs)."""
    entry = get_entry(name)
    if entry.trained and trained:
        return _trained_model(entry, kwargs)
    # Seeded init: the same model twice has the same weights, so its export and measurements are cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return entry.factory(**kwargs).eval()


# ---------------------------------------------------------------------------------------------------
# Trained entries: trained once on their data set (`_TRAIN_DATA`), then loaded from the cache.


@dataclass(frozen=True)
class _TrainRecipe:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    seed: int


# ~99.5 % test top-1 (>= 97 % across seeds) in about 3 s on 2 CPU cores.
_RECIPES = {
    "digits-cnn": _TrainRecipe(epochs=10, lr=3e-3, batch_size=64, weight_decay=1e-4, seed=0),
    # 91.8 % test top-1 (92.2 % val) after 3 epochs; 13 min on 2 CPU cores shared with other jobs (load 4-5).
    "fashion-cnn": _TrainRecipe(epochs=3, lr=3e-3, batch_size=128, weight_decay=1e-4, seed=0),
}
# The `--data` spec each trained entry learns from (its train split, at the entry's input shape).
_TRAIN_DATA = {"digits-cnn": "digits", "fashion-cnn": "fashion-mnist"}


def _trained_model(entry: ZooEntry, kwargs: dict) -> nn.Module:
    recipe = _RECIPES[entry.name]
    # Seeded init without touching the caller's RNG: the same kwargs give the same trained weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = entry.factory(**kwargs)
    path = cache_dir("zoo") / f"{entry.name}-{_weights_key(entry, model, recipe)}.pt"
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        # A damaged file fails in many ways (unpickling, zip, shape mismatch); any of them means the
        # cache cannot be trusted, so train again and overwrite it.
        except Exception as exc:
            logging.getLogger("squeeze.zoo").warning(f"cached weights {path} are unreadable ({first_line(exc)}); "
                                                     "training again")

    from squeeze.data import load_data  # the data set's own needs (scikit-learn, a package) only on first use

    train_classifier(model, load_data(_TRAIN_DATA[entry.name], input_shape=entry.input_shape).train,
                     **asdict(recipe))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return model.eval()


def _weights_key(entry: ZooEntry, model: nn.Module, recipe: _TrainRecipe) -> str:
    """Short hash of what determines the weights: architecture, recipe, data, torch major.minor."""
    torch_version = ".".join(torch.__version__.split(".")[:2])
    identity = {
        "model": repr(model),
        "recipe": asdict(recipe),
        "input_shape": list(entry.input_shape),
        "torch": torch_version,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------
# Shared building block.


def _conv_bn_act(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, act=nn.ReLU):
    """conv (no bias, BN follows) -> BN -> activation; `act=None` leaves the output linear."""
    layers = [
        nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------------------
# ResNet-18 (He et al. 2016, Table 1): BasicBlock x [2, 2, 2, 2].


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_act(c_in, c_out, 3, stride)
        self.conv2 = _conv_bn_act(c_out, c_out, 3, act=None)
        # Projection shortcut whenever the shape changes, identity otherwise.
        self.downsample = (
            _conv_bn_act(c_in, c_out, 1, stride, act=None) if stride != 1 or c_in != c_out else None
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + shortcut)


class _ResNet(nn.Module):
    def __init__(self, blocks_per_stage: list[int], num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn_act(3, 64, 7, stride=2), nn.MaxPool2d(3, stride=2, padding=1)
        )  # (B, 64, H/4, W/4)
        stages, c_in = [], 64
        for i, n_blocks in enumerate(blocks_per_stage):
            c_out = 64 * 2**i
            stride = 1 if i == 0 else 2
            blocks = [_BasicBlock(c_in, c_out, stride)]
            blocks += [_BasicBlock(c_out, c_out, 1) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)  # (B, 512, H/32, W/32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def resnet18(num_classes: int = 1000) -> nn.Module:
    return _ResNet([2, 2, 2, 2], num_classes)


# ---------------------------------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018, Table 2): inverted residuals, linear bottlenecks.


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
        layers = [] if expansion == 1 else [_conv_bn_act(c_in, hidden, 1, act=nn.ReLU6)]
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),  # depthwise
            _conv_bn_act(hidden, c_out, 1, act=None),  # linear bottleneck
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
        layers = [_conv_bn_act(3, c_in, 3, stride=2, act=nn.ReLU6)]
        for t, c, n, s in _MOBILENET_V2_STAGES:
            c_out = _make_divisible(c * width_mult)
            for i in range(n):
                layers.append(_InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        layers.append(_conv_bn_act(c_in, c_last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)  # (B, c_last, H/32, W/32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c_last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def mobilenet_v2(num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> nn.Module:
    return _MobileNetV2(num_classes, width_mult, dropout)


# ---------------------------------------------------------------------------------------------------
# DenseNet-121 (Huang et al. 2017, Table 1): DenseNet-BC, every layer sees all earlier outputs.


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


# ---------------------------------------------------------------------------------------------------
# digits-cnn: a small residual CNN for the built-in 16x16 digits, trained on first use.


class _DigitsCNN(nn.Module):
    def __init__(self, num_classes: int, width: float) -> None:
        super().__init__()
        c16, c32, c64, c128 = (max(1, round(c * width)) for c in (16, 32, 64, 128))
        self.conv1 = _conv_bn_act(1, c16, 3)
        self.conv2 = _conv_bn_act(c16, c32, 3)
        self.pool1 = nn.MaxPool2d(2)  # 16x16 -> 8x8
        self.conv3 = _conv_bn_act(c32, c64, 3)
        # conv3 and conv4 outputs are summed, so their output channels are coupled for pruning.
        self.conv4 = _conv_bn_act(c64, c64, 3)
        self.pool2 = nn.MaxPool2d(2)  # 8x8 -> 4x4
        self.conv5 = _conv_bn_act(c64, c128, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.conv2(self.conv1(x)))
        x = self.conv3(x)
        x = self.pool2(x + self.conv4(x))
        return self.fc(torch.flatten(self.pool(self.conv5(x)), 1))


def digits_cnn(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return _DigitsCNN(num_classes, width)


# ---------------------------------------------------------------------------------------------------
# fashion-cnn: a small residual CNN for 28x28 Fashion-MNIST, trained on first use.


class _ResidualBlock(nn.Module):
    """Two 3x3 conv-BN at constant width, added to the input: the block's input and output channels are coupled."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_act(channels, channels, 3)
        self.conv2 = _conv_bn_act(channels, channels, 3, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


class _FashionCNN(nn.Module):
    def __init__(self, num_classes: int, width: float) -> None:
        super().__init__()
        c1, c2, c3 = (max(1, round(c * width)) for c in (32, 64, 128))
        # Strided from the first conv: layers at full resolution would cost most of a 2-core training budget.
        self.stem = _conv_bn_act(1, c1, 3, stride=2)  # 28x28 -> 14x14
        self.down2 = _conv_bn_act(c1, c2, 3, stride=2)  # -> 7x7
        self.stage2 = _ResidualBlock(c2)
        self.down3 = _conv_bn_act(c2, c3, 3, stride=2)  # -> 4x4
        self.stage3 = _ResidualBlock(c3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down2(self.stem(x)))
        return self.fc(torch.flatten(self.pool(self.stage3(self.down3(x))), 1))


def fashion_cnn(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return _FashionCNN(num_classes, width)
