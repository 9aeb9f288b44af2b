"""The replacement modules: a Ghost module and a Lego convolution, each a drop-in for a Conv2d (groups=1) that
exports to plain ONNX ops (Conv, Concat, Gather).

Both are built from a spec (`GhostSpec`, `LegoSpec`: plain JSON in the reparam plan) and the conv they replace,
with empty weights: a fit (squeeze.reparam.fit) or the checkpoint's state_dict fills them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GhostSpec", "LegoSpec", "GhostConv2d", "LegoConv2d", "build_replacement", "spec_from_json", "spec_from_key",
           "spec_json", "replaceable"]


@dataclass(frozen=True)
class GhostSpec:
    """Ghost module (Han et al., CVPR 2020): ratio s, cheap depthwise kernel d."""

    ratio: int = 2
    dw_size: int = 3
    type: str = "ghost"

    @property
    def key(self) -> str:
        return f"ghost_s{self.ratio}_d{self.dw_size}"


@dataclass(frozen=True)
class LegoSpec:
    """Lego filters (Yang et al., ICML 2019): o input splits, m = lego_ratio x n lego filters."""

    splits: int = 2
    lego_ratio: float = 0.5
    type: str = "lego"

    @property
    def key(self) -> str:
        return f"lego_o{self.splits}_m{self.lego_ratio:g}"

    def legos(self, out_channels: int) -> int:
        return max(1, round(self.lego_ratio * out_channels))


def spec_from_key(key: str) -> GhostSpec | LegoSpec:
    """`ghost_s2_d3` or `lego_o2_m0.5` back to its spec."""
    kind, first, second = key.split("_")
    if kind == "ghost":
        return GhostSpec(int(first[1:]), int(second[1:]))
    return LegoSpec(int(first[1:]), float(second[1:]))


def spec_from_json(obj: dict) -> GhostSpec | LegoSpec:
    fields = {k: v for k, v in obj.items() if k != "type"}
    return {"ghost": GhostSpec, "lego": LegoSpec}[obj["type"]](**fields)


def replaceable(conv: nn.Module, spec: GhostSpec | LegoSpec) -> str | None:
    """Why `conv` cannot take `spec` (None: it can)."""
    if type(conv) is not nn.Conv2d:
        return "not a Conv2d"
    if conv.groups != 1:
        return f"grouped (groups={conv.groups})"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return "padding other than zeros by numbers"
    if isinstance(spec, GhostSpec) and conv.out_channels < spec.ratio:
        return f"{conv.out_channels} output channels, fewer than the ratio {spec.ratio}"
    if isinstance(spec, LegoSpec) and conv.in_channels % spec.splits:
        return f"{conv.in_channels} input channels do not split in {spec.splits}"
    return None


class GhostConv2d(nn.Module):
    """(N, c, H, W) -> (N, n, H', W'): a primary conv to m = ceil(n / s) channels with the original kernel,
    stride and padding, a cheap depthwise d x d conv of those to m (s - 1) more, concatenated; `order` picks the
    n outputs, in the original conv's channel order, from the m s concatenated ones (a Gather in ONNX).

    The original layer's BN and ReLU follow the module, so primary and cheap channels each pass through BN and
    ReLU as in the reference; the cheap conv reads the primary's output before them (the reference's BN in
    between is an affine map a depthwise conv absorbs; its ReLU is left out so that the trained conv's own
    responses can be fitted linearly)."""

    def __init__(self, conv: nn.Conv2d, spec: GhostSpec) -> None:
        super().__init__()
        n, s, d = conv.out_channels, spec.ratio, spec.dw_size
        m = math.ceil(n / s)
        bias = conv.bias is not None
        self.out_channels = n
        self.primary = nn.Conv2d(conv.in_channels, m, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                                 bias=bias)
        self.cheap = nn.Conv2d(m, m * (s - 1), d, 1, d // 2, groups=m, bias=bias)
        self.register_buffer("order", torch.arange(n))  # (n,): original channel t is concat channel order[t]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.primary(x)
        return torch.cat([p, self.cheap(p)], 1).index_select(1, self.order)


class LegoConv2d(nn.Module):
    """(N, c, H, W) -> (N, n, H', W'): m lego filters B (m, c/o, k, k) shared by the o fragments of the input
    channels; output j is sum over fragments f of coef[j, f] times the lego map index[j, f] of fragment f.

    Efficient form: the o m lego maps once (one Conv with groups=o, its weight B tiled o times, which ONNX
    Runtime folds), the n o selected maps gathered, then combined by a 1x1 Conv with groups=n. The MACs are
    m c k^2 H'W' + n o H'W', the parameters B, coef and the bias: the selection is an integer buffer. While
    the selection is learned (`learn_selection`), real-valued scores pick it by argmax in the forward and take
    its gradient straight through (the reference's STE)."""

    def __init__(self, conv: nn.Conv2d, spec: LegoSpec) -> None:
        super().__init__()
        c, n, o = conv.in_channels, conv.out_channels, spec.splits
        m = spec.legos(n)
        self.splits, self.legos, self.out_channels = o, m, n
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.lego = nn.Parameter(torch.zeros(m, c // o, *conv.kernel_size))
        self.coef = nn.Parameter(torch.zeros(n, o))
        self.bias = nn.Parameter(torch.zeros(n)) if conv.bias is not None else None
        self.register_buffer("index", torch.zeros(n, o, dtype=torch.long))  # (n, o): lego chosen per fragment
        self.register_parameter("scores", None)

    def reset_parameters(self) -> None:
        """A random start, for training the architecture from scratch: lego filters as a conv's default init,
        unit coefficients, a random selection."""
        nn.init.kaiming_uniform_(self.lego, a=math.sqrt(5))
        nn.init.ones_(self.coef)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        with torch.no_grad():
            self.index.random_(0, self.legos)

    def lego_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(N, o m, H', W'): channel f m + l is lego filter l on fragment f."""
        weight = self.lego.repeat(self.splits, 1, 1, 1)
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.splits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.lego_maps(x)
        n, o, m = self.out_channels, self.splits, self.legos
        if self.scores is not None and self.training:
            hard = F.one_hot(self.scores.argmax(-1), m).to(self.scores.dtype)
            select = hard + self.scores - self.scores.detach()  # forward one-hot, gradient to the scores
            weight = (select * self.coef[..., None]).reshape(n, o * m, 1, 1)
            return F.conv2d(maps, weight, self.bias)
        picked = maps.index_select(1, self.gather_index())  # (N, n o, H', W')
        return F.conv2d(picked, self.coef.reshape(n, o, 1, 1), self.bias, groups=n)

    def gather_index(self) -> torch.Tensor:
        """(n o,): output j's maps, fragment by fragment."""
        offsets = torch.arange(self.splits, device=self.index.device) * self.legos
        return (self.index + offsets).reshape(-1)

    def learn_selection(self, margin: float = 1.0) -> None:
        """Make the selection trainable: scores start at `margin` on the current choice, 0 elsewhere."""
        scores = F.one_hot(self.index, self.legos).float() * margin
        self.scores = nn.Parameter(scores.to(self.coef.device))

    def freeze_selection(self) -> None:
        if self.scores is not None:
            self.index.copy_(self.scores.detach().argmax(-1))
            self.scores = None


def build_replacement(conv: nn.Conv2d, spec: GhostSpec | LegoSpec) -> nn.Module:
    return GhostConv2d(conv, spec) if isinstance(spec, GhostSpec) else LegoConv2d(conv, spec)


def spec_json(spec: GhostSpec | LegoSpec) -> dict:
    return asdict(spec)
