"""The reparam plan: which convs were replaced by which module (plain JSON, replayable without pickle).

    {"kind": "reparam", "version": 1, "layers": {"layer1.0.conv1": {"type": "ghost", "ratio": 2, "dw_size": 3}}}

A checkpoint replays it on the freshly built architecture (after any channel plan before it): each named conv
is swapped for an empty replacement of the same shape, then the state_dict fills it.
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


def plan_json(specs: Mapping[str, GhostSpec | LegoSpec]) -> dict[str, Any]:
    return {"kind": PLAN_KIND, "version": PLAN_VERSION, "layers": {n: spec_json(s) for n, s in specs.items()}}


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
    replacements = {}
    for name, obj in plan["layers"].items():
        try:
            conv, spec = module.get_submodule(name), spec_from_json(dict(obj))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"The reparam plan names layer {name!r} ({obj!r}), which this architecture "
                                 f"cannot take ({type(exc).__name__}: {exc}).",
                                 "The checkpoint does not match its architecture; re-run squeeze reparam.") from exc
        why = replaceable(conv, spec)
        if why:
            raise ModelLoadError(f"The reparam plan replaces {name!r}, but that layer is {why}.",
                                 "The checkpoint does not match its architecture; re-run squeeze reparam.")
        replacements[name] = build_replacement(conv, spec)
    return replace_layers(module, replacements)
