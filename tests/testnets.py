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


# --- held-out architectures: torchvision's structure without torchvision -------------------------
# Each factory builds the real widths by default (for figures); tests pass a smaller `width` (a
# multiplier on every channel count), fewer blocks and small inputs.


def _ch(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


def _bn_relu_conv(c_in: int, c_out: int, k, s=1, p=0, groups: int = 1, relu: bool = True, bn=nn.BatchNorm2d,
                  conv=nn.Conv2d, eps: float = 1e-5) -> nn.Sequential:
    """conv (no bias) -> BN -> optional ReLU, the block every CNN here is made of."""
    layers = [conv(c_in, c_out, k, s, p, groups=groups, bias=False), bn(c_out, eps=eps)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)  # (B, g, C/g, H, W)
    x = torch.transpose(x, 1, 2).contiguous()  # (B, C/g, g, H, W)
    return x.view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: stride 1 splits the channels in two (chunk) and transforms one half;
    stride 2 transforms the input in two branches; both concatenate and shuffle the channels."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        half = c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(_bn_relu_conv(c_in, c_in, 3, stride, 1, groups=c_in, relu=False),
                                         _bn_relu_conv(c_in, half, 1))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            _bn_relu_conv(c_in if stride > 1 else half, half, 1),
            _bn_relu_conv(half, half, 3, stride, 1, groups=half, relu=False),
            _bn_relu_conv(half, half, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats=(4, 8, 4), channels=(24, 116, 232, 464, 1024), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = _bn_relu_conv(3, channels[0], 3, 2, 1)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, c_in = [], channels[0]
        for n, c_out in zip(repeats, channels[1:4]):
            units = [ShuffleUnit(c_in, c_out, 2)] + [ShuffleUnit(c_out, c_out, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            c_in = c_out
        self.stage2, self.stage3, self.stage4 = stages
        self.conv5 = _bn_relu_conv(c_in, channels[4], 1)
        self.fc = nn.Linear(channels[4], num_classes)

    def forward(self, x):
        x = self.stage4(self.stage3(self.stage2(self.maxpool(self.conv1(x)))))
        return self.fc(self.conv5(x).mean([2, 3]))


def shufflenet_v2(width: float = 1.0, repeats=(4, 8, 4), num_classes: int = 1000) -> nn.Module:
    """shufflenet_v2_x1_0 at width 1; branch widths stay even (the split halves the channels)."""
    torch.manual_seed(0)
    channels = [_ch(24, width)] + [2 * _ch(c // 2, width) for c in (116, 232, 464)] + [_ch(1024, width)]
    return ShuffleNetV2(tuple(repeats), tuple(channels), num_classes).eval()


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, computed channels-last."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims) -> None:
        super().__init__()
        self.dims = list(dims)

    def forward(self, x):
        return torch.permute(x, self.dims)


class StochasticDepth(nn.Module):
    """Drops the whole residual branch per sample while training (torchvision.ops, mode "row")."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype).bernoulli_(1.0 - self.p)
        return x * noise.div_(1.0 - self.p)


class CNBlock(nn.Module):
    """depthwise 7x7 -> channels-last LayerNorm -> Linear 4x -> GELU -> Linear -> layer scale -> drop path."""

    def __init__(self, dim: int, layer_scale: float, drop_p: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]), nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)  # (C, 1, 1)
        self.stochastic_depth = StochasticDepth(drop_p)

    def forward(self, x):
        result = self.stochastic_depth(self.layer_scale * self.block(x))
        result += x
        return result


class ConvNeXt(nn.Module):
    def __init__(self, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), num_classes: int = 1000,
                 layer_scale: float = 1e-6, drop_path: float = 0.1) -> None:
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))]
        total, done = sum(depths), 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(dim, layer_scale, drop_path * (done + j) / (total - 1))
                                          for j in range(depth)]))
            done += depth
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Conv2d(dim, dims[i + 1], 2, 2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1),
                                        nn.Linear(dims[-1], num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def convnext_tiny(width: float = 1.0, depths=(3, 3, 9, 3), num_classes: int = 1000,
                  layer_scale: float = 1e-6) -> nn.Module:
    torch.manual_seed(0)
    return ConvNeXt(tuple(_ch(d, width) for d in (96, 192, 384, 768)), tuple(depths), num_classes, layer_scale).eval()


class _Branches(nn.Module):
    """Runs each branch on the same input and concatenates their outputs along the channels."""

    def forward(self, x):
        return torch.cat(self.branches(x), 1)


class InceptionA(_Branches):
    def __init__(self, c_in: int, pool: int, w: float) -> None:
        super().__init__()
        c = lambda n: _ch(n, w)  # noqa: E731
        self.b1 = _inc(c_in, c(64), 1)
        self.b5 = nn.Sequential(_inc(c_in, c(48), 1), _inc(c(48), c(64), 5, p=2))
        self.b3 = nn.Sequential(_inc(c_in, c(64), 1), _inc(c(64), c(96), 3, p=1), _inc(c(96), c(96), 3, p=1))
        self.bp = _inc(c_in, pool, 1)
        self.out_channels = c(64) + c(64) + c(96) + pool

    def branches(self, x):
        return [self.b1(x), self.b5(x), self.b3(x), self.bp(nn.functional.avg_pool2d(x, 3, 1, 1))]


class InceptionB(_Branches):
    def __init__(self, c_in: int, w: float) -> None:
        super().__init__()
        c = lambda n: _ch(n, w)  # noqa: E731
        self.b3 = _inc(c_in, c(384), 3, s=2)
        self.b3d = nn.Sequential(_inc(c_in, c(64), 1), _inc(c(64), c(96), 3, p=1), _inc(c(96), c(96), 3, s=2))
        self.out_channels = c(384) + c(96) + c_in

    def branches(self, x):
        return [self.b3(x), self.b3d(x), nn.functional.max_pool2d(x, 3, 2)]


class InceptionC(_Branches):
    def __init__(self, c_in: int, c7: int, w: float) -> None:
        super().__init__()
        c192 = _ch(192, w)
        self.b1 = _inc(c_in, c192, 1)
        self.b7 = nn.Sequential(_inc(c_in, c7, 1), _inc(c7, c7, (1, 7), p=(0, 3)), _inc(c7, c192, (7, 1), p=(3, 0)))
        self.b7d = nn.Sequential(_inc(c_in, c7, 1), _inc(c7, c7, (7, 1), p=(3, 0)), _inc(c7, c7, (1, 7), p=(0, 3)),
                                 _inc(c7, c7, (7, 1), p=(3, 0)), _inc(c7, c192, (1, 7), p=(0, 3)))
        self.bp = _inc(c_in, c192, 1)
        self.out_channels = 4 * c192

    def branches(self, x):
        return [self.b1(x), self.b7(x), self.b7d(x), self.bp(nn.functional.avg_pool2d(x, 3, 1, 1))]


class InceptionD(_Branches):
    def __init__(self, c_in: int, w: float) -> None:
        super().__init__()
        c192, c320 = _ch(192, w), _ch(320, w)
        self.b3 = nn.Sequential(_inc(c_in, c192, 1), _inc(c192, c320, 3, s=2))
        self.b7 = nn.Sequential(_inc(c_in, c192, 1), _inc(c192, c192, (1, 7), p=(0, 3)),
                                _inc(c192, c192, (7, 1), p=(3, 0)), _inc(c192, c192, 3, s=2))
        self.out_channels = c320 + c192 + c_in

    def branches(self, x):
        return [self.b3(x), self.b7(x), nn.functional.max_pool2d(x, 3, 2)]


class InceptionE(_Branches):
    """Two branches end in a 1x3 and a 3x1 conv reading the same tensor, concatenated."""

    def __init__(self, c_in: int, w: float) -> None:
        super().__init__()
        c = lambda n: _ch(n, w)  # noqa: E731
        self.b1 = _inc(c_in, c(320), 1)
        self.b3_1 = _inc(c_in, c(384), 1)
        self.b3_2a, self.b3_2b = _inc(c(384), c(384), (1, 3), p=(0, 1)), _inc(c(384), c(384), (3, 1), p=(1, 0))
        self.b3d_1 = nn.Sequential(_inc(c_in, c(448), 1), _inc(c(448), c(384), 3, p=1))
        self.b3d_3a, self.b3d_3b = _inc(c(384), c(384), (1, 3), p=(0, 1)), _inc(c(384), c(384), (3, 1), p=(1, 0))
        self.bp = _inc(c_in, c(192), 1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def branches(self, x):
        b3, b3d = self.b3_1(x), self.b3d_1(x)
        return [self.b1(x), torch.cat([self.b3_2a(b3), self.b3_2b(b3)], 1),
                torch.cat([self.b3d_3a(b3d), self.b3d_3b(b3d)], 1), self.bp(nn.functional.avg_pool2d(x, 3, 1, 1))]


def _inc(c_in: int, c_out: int, k, s=1, p=0) -> nn.Sequential:
    return _bn_relu_conv(c_in, c_out, k, s, p, eps=0.001)


class InceptionV3(nn.Module):
    """torchvision's inception_v3 with aux_logits=False, transform_input=False (input 299x299; >= 75x75)."""

    def __init__(self, w: float = 1.0, num_classes: int = 1000, repeats=(3, 4, 2)) -> None:
        """repeats: how many A, C and E blocks (torchvision: 3, 4, 2); one B and one D block between them."""
        super().__init__()
        c = lambda n: _ch(n, w)  # noqa: E731
        self.stem = nn.Sequential(
            _inc(3, c(32), 3, s=2), _inc(c(32), c(32), 3), _inc(c(32), c(64), 3, p=1), nn.MaxPool2d(3, 2),
            _inc(c(64), c(80), 1), _inc(c(80), c(192), 3), nn.MaxPool2d(3, 2))
        n_a, n_c, n_e = repeats
        blocks = [InceptionA(c(192), c(32), w)]
        for _ in range(n_a - 1):
            blocks.append(InceptionA(blocks[-1].out_channels, c(64), w))
        blocks.append(InceptionB(blocks[-1].out_channels, w))
        for c7 in (128, 160, 160, 192)[-n_c:]:
            blocks.append(InceptionC(blocks[-1].out_channels, c(c7), w))
        blocks.append(InceptionD(blocks[-1].out_channels, w))
        for _ in range(n_e):
            blocks.append(InceptionE(blocks[-1].out_channels, w))
        self.mixed = nn.Sequential(*blocks)
        self.fc = nn.Linear(blocks[-1].out_channels, num_classes)
        # Kaiming, not torchvision's trunc-normal std 0.1: with BatchNorm at its initial statistics (an
        # identity) that grows activations ~3x per conv at full width (outputs ~1e12) and shrinks them at
        # small widths; He init keeps outputs O(1) at every width, so errors and pruning effects are readable.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.mixed(self.stem(x)), 1)
        return self.fc(torch.flatten(nn.functional.dropout(x, 0.5, self.training), 1))


def inception_v3(width: float = 1.0, num_classes: int = 1000, repeats=(3, 4, 2)) -> nn.Module:
    torch.manual_seed(0)
    return InceptionV3(width, num_classes, tuple(repeats)).eval()


class BasicBlock3d(nn.Module):
    """R3D's basic block: two 3x3x3 Conv3d + BatchNorm3d and a residual add (a strided 1x1x1 projection
    where the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        conv = dict(bn=nn.BatchNorm3d, conv=nn.Conv3d)
        self.conv1 = _bn_relu_conv(c_in, c_out, 3, stride, 1, **conv)
        self.conv2 = _bn_relu_conv(c_out, c_out, 3, 1, 1, relu=False, **conv)
        self.downsample = (_bn_relu_conv(c_in, c_out, 1, stride, 0, relu=False, **conv)
                           if stride != 1 or c_in != c_out else None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.relu(out)


class R3D(nn.Module):
    def __init__(self, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), num_classes: int = 400) -> None:
        super().__init__()
        # (N, 3, T, H, W): the stem keeps T and halves H, W
        self.stem = _bn_relu_conv(3, widths[0], (3, 7, 7), (1, 2, 2), (1, 3, 3), bn=nn.BatchNorm3d, conv=nn.Conv3d)
        layers, c_in = [], widths[0]
        for i, (c, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock3d(c_in, c, stride), *[BasicBlock3d(c, c, 1) for _ in range(n - 1)]))
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(self.avgpool(self.layers(self.stem(x))).flatten(1))


def r3d_18(width: float = 1.0, blocks=(2, 2, 2, 2), num_classes: int = 400) -> nn.Module:
    """Input (N, 3, T, H, W), e.g. 1x3x8x112x112."""
    torch.manual_seed(0)
    return R3D(tuple(_ch(c, width) for c in (64, 128, 256, 512)), tuple(blocks), num_classes).eval()


# Small variants for tests (CLI refs take no arguments); the input shapes they are tested at:
HELD_OUT_SHAPES = {"tiny_shufflenet_v2": (1, 3, 32, 32), "tiny_convnext": (1, 3, 32, 32),
                   "tiny_inception_v3": (1, 3, 75, 75), "tiny_r3d": (1, 3, 4, 16, 16)}


def tiny_shufflenet_v2() -> nn.Module:
    return shufflenet_v2(width=0.25, repeats=(2, 2, 2), num_classes=10)


def tiny_convnext() -> nn.Module:
    # layer scale 0.5 (not 1e-6): each block's branch must visibly change the output for parity tests
    return convnext_tiny(width=0.25, depths=(1, 1, 2, 1), num_classes=10, layer_scale=0.5)


def tiny_inception_v3() -> nn.Module:
    return inception_v3(width=0.25, num_classes=10, repeats=(1, 1, 1))


def tiny_r3d() -> nn.Module:
    return r3d_18(width=0.25, blocks=(1, 1, 1, 1), num_classes=10)


class SqueezeExcite(nn.Module):
    """EfficientNet's SE: global pool, reduce (1x1 conv), SiLU, expand, sigmoid gate on the channels."""

    def __init__(self, c: int, reduced: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, reduced, 1), nn.Conv2d(reduced, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(nn.functional.silu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand, k x k depthwise, SE, 1x1 project (linear); residual at stride 1."""

    def __init__(self, c_in: int, c_out: int, expansion: int, k: int, stride: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        expand = [] if expansion == 1 else [_bn_relu_conv(c_in, hidden, 1, relu=False), nn.SiLU()]
        self.block = nn.Sequential(*expand, _bn_relu_conv(hidden, hidden, k, stride, k // 2, groups=hidden, relu=False),
                                   nn.SiLU(), SqueezeExcite(hidden, max(1, c_in // 4)),
                                   _bn_relu_conv(hidden, c_out, 1, relu=False))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


# (expansion, channels, repeats, stride, kernel): EfficientNet-B0's stages
_EFFICIENTNET_B0 = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
                    (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))


def efficientnet_b0(width: float = 1.0, depth: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """EfficientNet-B0's structure (SiLU, SE in every block); `depth` scales each stage's repeats."""
    torch.manual_seed(0)
    c_in = _ch(32, width)
    layers = [_bn_relu_conv(3, c_in, 3, 2, 1, relu=False), nn.SiLU()]
    for t, c, n, s, k in _EFFICIENTNET_B0:
        c_out = _ch(c, width)
        for i in range(max(1, round(n * depth))):
            layers.append(MBConv(c_in, c_out, t, k, s if i == 0 else 1))
            c_in = c_out
    c_head = _ch(1280, width)
    return nn.Sequential(*layers, _bn_relu_conv(c_in, c_head, 1, relu=False), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(c_head, num_classes)).eval()


class XBlock(nn.Module):
    """RegNetX's block: 1x1, 3x3 grouped (fixed group width), 1x1; a projection shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, group_width: int) -> None:
        super().__init__()
        groups = max(1, c_out // group_width)
        self.block = nn.Sequential(_bn_relu_conv(c_in, c_out, 1), _bn_relu_conv(c_out, c_out, 3, stride, 1, groups=groups),
                                   _bn_relu_conv(c_out, c_out, 1, relu=False))
        self.shortcut = (_bn_relu_conv(c_in, c_out, 1, stride, relu=False) if stride > 1 or c_in != c_out
                         else nn.Identity())

    def forward(self, x):
        return torch.relu(self.shortcut(x) + self.block(x))


def regnet_x_400mf(width: float = 1.0, depths=(1, 2, 7, 12), num_classes: int = 1000) -> nn.Module:
    """RegNetX-400MF's structure: widths (32, 64, 160, 384), group width 16."""
    torch.manual_seed(0)
    group_width = max(1, _ch(16, width))
    stem = _ch(32, width)
    layers, c_in = [_bn_relu_conv(3, stem, 3, 2, 1)], stem
    for c, n in zip((32, 64, 160, 384), depths):
        c_out = _ch(c, width) // group_width * group_width
        for i in range(n):
            layers.append(XBlock(c_in, c_out, 2 if i == 0 else 1, group_width))
            c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)).eval()


def tiny_mobilenet() -> nn.Module:
    """MobileNetV2-like: a stem, two inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 project), a head."""
    torch.manual_seed(0)

    def inverted(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        hidden = 4 * c_in
        return nn.Sequential(_bn_relu_conv(c_in, hidden, 1), _bn_relu_conv(hidden, hidden, 3, stride, 1, groups=hidden),
                             _bn_relu_conv(hidden, c_out, 1, relu=False))

    return nn.Sequential(_bn_relu_conv(3, 8, 3, 2, 1), inverted(8, 16, 2), inverted(16, 16, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 10)).eval()
