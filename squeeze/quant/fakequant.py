"""Weight fake-quantization in torch, by the rules ONNX Runtime applies at export: one home for QAT and HAQ.

Rounding is round-half-to-even forward and identity backward (straight-through estimator); values the
range clips get no gradient. Scales are computed without gradient, as ORT derives them from the weights.
  symmetric    per output channel (dim 0) or per tensor: scale = max|w| / L over [-L, L], zero point 0;
               L = 2^(b-1) - 1 (int8: 127), 64 for 7-bit int8 weights (ORT's reduce_range)
  asymmetric   uint8: scale = (max(w, 0) - min(w, 0)) / 255, zero point round(-min / scale) over [0, 255]
               (onnxruntime.quantization.quant_utils.compute_scale_zp)
  4-bit blocks MatMulNBits: blocks along the input dim, the value of largest magnitude maps to -8
An all-zero channel (or block) keeps scale 1, so it stays zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["round_ste", "weight_levels", "int8_reduce_range", "fake_quant_weight", "fake_int4_weight",
           "WeightFakeQuant"]


def round_ste(v: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (straight-through estimator)."""
    return v + (torch.round(v) - v).detach()


def weight_levels(bits: int, reduce_range: bool = False) -> int:
    """L of a symmetric b-bit weight grid [-L, L]; 7-bit int8 weights (`reduce_range`) take ORT's 64."""
    return 64 if bits == 8 and reduce_range else 2 ** (bits - 1) - 1


def int8_reduce_range() -> bool:
    """7-bit int8 weights where the CPU has no int8 dot product: ORT's u8s8 kernels there sum products
    pairwise in 16 bits, which 8-bit weights can saturate (squeeze.quant.parity). Stored as int8 all the same."""
    from squeeze.measure.environment import cpu_features

    return not cpu_features()["int8_dot_product"]


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fake_quant_weight(w: torch.Tensor, levels: int = 127, per_channel: bool = True, symmetric: bool = True
                      ) -> torch.Tensor:
    """`w` (C_out, ...) on the grid ORT quantizes it to: symmetric over [-levels, levels], or asymmetric uint8."""
    dims = tuple(range(1, w.ndim)) if per_channel else tuple(range(w.ndim))
    with torch.no_grad():
        lo = w.amin(dim=dims, keepdim=True).clamp_max(0)
        hi = w.amax(dim=dims, keepdim=True).clamp_min(0)
        if symmetric:
            scale = _nonzero(torch.maximum(-lo, hi) / levels)
        else:
            scale = _nonzero((hi - lo) / 255.0)
            zero = torch.round(-lo / scale)
    if symmetric:
        return torch.clamp(round_ste(w / scale), -levels, levels) * scale
    return (torch.clamp(round_ste(w / scale + zero), 0, 255) - zero) * scale


def fake_int4_weight(w: torch.Tensor, block: int) -> torch.Tensor:
    """(N, K) Linear weight as MatMulNBits stores it: symmetric 4-bit blocks of `block` along K, levels
    -8..7, scale = the block's value of largest magnitude / -8."""
    n, k = w.shape
    blocks = F.pad(w, (0, (-k) % block)).reshape(n, -1, block)
    idx = blocks.abs().argmax(dim=2, keepdim=True)
    scale = (blocks.gather(2, idx) / -8).detach()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(round_ste(blocks / scale), -8, 7) * scale
    return q.reshape(n, -1)[:, :k]


class WeightFakeQuant(nn.Module):
    """A parametrization of a Conv/Linear weight: the weight as ORT quantizes it at export (int8 symmetric,
    127 levels or 64 with `reduce_range`; uint8 asymmetric), per output channel or per tensor."""

    def __init__(self, per_channel: bool, symmetric: bool, reduce_range: bool = False) -> None:
        super().__init__()
        self.per_channel, self.symmetric = per_channel, symmetric
        self.levels = weight_levels(8, reduce_range)
        self.enabled = True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return fake_quant_weight(w, self.levels, self.per_channel, self.symmetric)
