"""The reparam plan: which convs were replaced by which module (plain JSON, replayable without pickle).

    {"kind": "reparam", "version": 1,
     "layers": {"layer1.0.conv1.0": {"type": "ghost", "ratio": 2, "dw_size": 3, "absorbs": "layer1.0.conv1.1"}}}

A checkpoint replays it on the freshly built architecture (after any channel plan before it): each named conv
is swapped for an empty replacement of the same shape (with biases where it absorbed the BatchNorm that followed
it, which becomes an identity), then the state_dict fills it.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from squeeze.errors import ModelLoadError
from squeeze.model.loading import register_plan_kind
from squeeze.reparam.modules import GhostSpec, LegoSpec, build_replacement, replaceable, spec_from_json, spec_json

__all__ = ["PLAN_KIND", "plan_json", "replace_layers", "replay_reparam_plan"]

PLAN_KIND = "reparam"
PLAN_VERSION = 1


def plan_json(specs: Mapping[str, GhostSpec | LegoSpec], absorbs: Mapping[str, str]) -> dict[str, Any]:
    layers = {n: {**spec_json(s), **({"absorbs": absorbs[n]} if n in absorbs else {})} for n, s in specs.items()}
    return {"kind": PLAN_KIND, "version": PLAN_VERSION, "layers": layers}


def replace_layers(module: nn.Module, replacements: Mapping[str, nn.Module]) -> nn.Module:
    """Swap the named submodules of `module` in place."""
    for name, new in replacements.items():
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, new)
    return module


@register_plan_kind(PLAN_KIND)
def replay_reparam_plan(module: nn.Module, plan: Mapping[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    if plan.get("version") != PLAN_VERSION or not isinstance(plan.get("layers"), Mapping):
        raise ModelLoadError(f"The reparam plan (version {plan.get('version')!r}) cannot be replayed by this "
                             f"squeeze (reads version {PLAN_VERSION}).", "Upgrade squeeze.")
    replacements: dict[str, nn.Module] = {}
    for name, obj in plan["layers"].items():
        try:
            entry = dict(obj)
            bn = entry.pop("absorbs", None)
            conv, spec = module.get_submodule(name), spec_from_json(entry)
            if bn is not None:
                if not isinstance(module.get_submodule(bn), nn.BatchNorm2d):
                    raise ValueError(f"{bn} is not a BatchNorm2d")
                replacements[bn] = nn.Identity()
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"The reparam plan names layer {name!r} ({obj!r}), which this architecture "
                                 f"cannot take ({type(exc).__name__}: {exc}).",
                                 "The checkpoint does not match its architecture; re-run squeeze reparam.") from exc
        why = replaceable(conv, spec)
        if why:
            raise ModelLoadError(f"The reparam plan replaces {name!r}, but that layer is {why}.",
                                 "The checkpoint does not match its architecture; re-run squeeze reparam.")
        if bn is not None:  # the shape of the conv with the BatchNorm folded in: a bias
            conv = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, bias=True)
        replacements[name] = build_replacement(conv, spec)
    return replace_layers(module, replacements)
