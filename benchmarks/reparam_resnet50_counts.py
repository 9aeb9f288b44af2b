"""MACs and parameters of squeeze's Ghost and Lego replacements of a ResNet-50 definition at 224.

Every bottleneck conv and every 1x1 downsample replaced, stem and fc kept (as Ghost-ResNet-50 and
Lego-ResNet-50); counted on what the forward computes (torch's FLOP counter) and the parameters it holds.
Published recounts: Ghost s=2 2.151G / s=4 1.182G MACs; Lego o=2 m=0.5 8.03M params, 2.13G MACs.

    python benchmarks/reparam_resnet50_counts.py
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from squeeze.model.zoo.resnet import resnet50
from squeeze.reparam.modules import GhostSpec, LegoSpec, build_replacement
from squeeze.reparam.plan import replace_layers


def count(module: nn.Module) -> tuple[int, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval()(torch.zeros(1, 3, 224, 224))
    return counter.get_total_flops() // 2, sum(p.numel() for p in module.parameters())


def main() -> None:
    macs, params = count(resnet50())
    print(f"ResNet-50: {macs / 1e9:.3f}G MACs, {params / 1e6:.2f}M params")
    for spec in (GhostSpec(2), GhostSpec(4), LegoSpec(2, 0.5)):
        model = resnet50()
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("stages")]
        replace_layers(model, {n: build_replacement(model.get_submodule(n), spec) for n in names})
        macs, params = count(model)
        print(f"{spec.key} ({len(names)} convs replaced): {macs / 1e9:.3f}G MACs, {params / 1e6:.2f}M params")


if __name__ == "__main__":
    main()
