"""Sampled im2col rows of a layer's input with the layer's output at the same positions: what least-squares fits
of a layer to its own responses (AMC's reconstruction, reparam's initialisation) are solved on."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["sample_patches"]


def sample_patches(m: nn.Module, x: torch.Tensor, y: torch.Tensor, points: int, generator: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`points` random output positions per image: (rows, C_in, kH * kW) input patches and (rows, C_out) outputs
    without the bias. A Linear's sample is its whole input."""
    bias = 0 if m.bias is None else m.bias
    if y.ndim == 2:  # Linear on (N, C)
        return x[:, :, None].clone(), y - bias
    cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (N, C_in * kH * kW, L)
    out = y.flatten(2)  # (N, C_out, L)
    idx = torch.randint(0, out.shape[2], (len(x), points), generator=generator)  # (N, points)
    cols = cols.gather(2, idx[:, None].expand(-1, cols.shape[1], -1)).transpose(1, 2)  # (N, points, C_in kk)
    out = out.gather(2, idx[:, None].expand(-1, out.shape[1], -1)).transpose(1, 2)  # (N, points, C_out)
    k = math.prod(m.kernel_size)
    bias = bias[None] if torch.is_tensor(bias) else bias
    return cols.reshape(-1, x.shape[1], k), out.reshape(-1, out.shape[2]) - bias
