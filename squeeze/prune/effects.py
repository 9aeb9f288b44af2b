"""What a width change of one pruning group does to a model's layer configurations, without pruning it.

A latency table prices layer configurations, so a proposal "group G at width w" can be priced without
building the pruned model (a deep copy plus a dependency-graph trace: about a second at 224x224). The
group's dependency list says which layers lose k = width_now - w channels and on which side: output
channels (the group's convs, BatchNorms, depthwise convs, which lose both sides) or input channels (the
consumers). Pruning k channels removes k channels from every member, concatenation slices included.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from squeeze.measure.lut import LayerConfig, layer_configs
from squeeze.prune.graph import trace_coupling

__all__ = ["WidthEffects"]


class WidthEffects:
    def __init__(self, module: nn.Module, example_input: torch.Tensor) -> None:
        self.configs = layer_configs(module, example_input)  # name -> LayerConfig of the current model
        coupling = trace_coupling(copy.deepcopy(module), example_input)
        names = {m: n for n, m in coupling.module.named_modules()}
        self.widths = coupling.table.widths()
        # root -> {layer name: the sides that lose channels, "out" and/or "in"} for the layers the table
        # prices; a conv can be both (it reads a residual stream and adds its output back to it)
        self.members: dict[str, dict[str, set[str]]] = {}
        for root, group in coupling.groups.items():
            sides: dict[str, set[str]] = {}
            for item in group:
                name = names.get(item.dep.target.module)
                if name in self.configs:
                    out = coupling.graph.is_out_channel_pruning_fn(item.dep.handler)
                    sides.setdefault(name, set()).add("out" if out else "in")
            self.members[root] = sides

    def configs_at(self, root: str, width: int) -> dict[str, LayerConfig]:
        """The model's layer configurations with group `root` pruned to `width` output channels."""
        return self.configs_with({root: width})

    def configs_with(self, widths: Mapping[str, int]) -> dict[str, LayerConfig]:
        """The model's layer configurations with every group in `widths` pruned to its width: the cuts add up
        (a conv between two groups loses input channels to one and output channels to the other)."""
        out = dict(self.configs)
        for root, width in widths.items():
            k = self.widths[root] - width
            for name, sides in self.members[root].items():
                c = out[name]
                if c.op in ("bn2d", "bn3d") or (c.groups == c.c_in == c.c_out and c.groups > 1):  # per-channel ops: both sides
                    n = c.c_out - k
                    out[name] = replace(c, c_in=n, c_out=n, groups=n if c.groups > 1 else 1)
                else:
                    out[name] = replace(c, c_in=c.c_in - k * ("in" in sides), c_out=c.c_out - k * ("out" in sides))
        return out
