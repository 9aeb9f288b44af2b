"""Channel plans: which output channels of each prunable layer survive, as plain JSON.

A plan names layers by their pruning-group root (see `squeeze.prune.graph`) and records the exact
channel indices kept, so it replays bit-for-bit on the original architecture: a pruned checkpoint is
rebuilt as factory -> replay plan -> load the pruned state_dict. Layers absent from a plan keep all
their channels.

This module does not import torch: reports and the CLI read plans without loading a model.

    {"kind": "channels", "version": 1, "round_to": 8, "importance": "l1",
     "keep": {"stem.0.0": 32}, "kept_indices": {"stem.0.0": [0, 3, 4, ...]}}
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from squeeze.errors import SqueezeError

if TYPE_CHECKING:
    from squeeze.prune.graph import LayerTable

__all__ = [
    "PLAN_KIND",
    "PLAN_VERSION",
    "ChannelPlan",
    "PlanError",
    "PruneError",
    "check_plan",
    "compose_plans",
    "plan_from_json",
    "plan_to_json",
    "round_width",
    "unknown_layer_error",
]

PLAN_KIND = "channels"
PLAN_VERSION = 1


class PruneError(SqueezeError):
    """Pruning cannot proceed: a bad criterion, missing data, or a model the graph cannot prune."""


class PlanError(PruneError):
    """A plan (or a width request) that does not fit the model: unknown layer, impossible width."""


@dataclass
class ChannelPlan:
    """Output channels kept per prunable layer (root name -> count and sorted original indices)."""

    keep: dict[str, int]
    kept_indices: dict[str, list[int]]
    round_to: int = 8
    importance: str = "l1"
    kind: str = field(default=PLAN_KIND, init=False)
    version: int = field(default=PLAN_VERSION, init=False)

    def to_json(self) -> dict[str, Any]:
        return plan_to_json(self)


def plan_to_json(plan: ChannelPlan) -> dict[str, Any]:
    """The plan as a JSON-ready dict (what goes into `LoadedModel.plans` and reports)."""
    return {
        "kind": PLAN_KIND,
        "version": PLAN_VERSION,
        "round_to": plan.round_to,
        "importance": plan.importance,
        "keep": {name: int(k) for name, k in plan.keep.items()},
        "kept_indices": {name: [int(i) for i in idxs] for name, idxs in plan.kept_indices.items()},
    }


def plan_from_json(obj: ChannelPlan | Mapping[str, Any] | str) -> ChannelPlan:
    """Parse and check the structure of a plan (dict, JSON text, or a ChannelPlan built by hand);
    model-specific checks: `check_plan`."""
    if isinstance(obj, ChannelPlan):  # validated as written, without plan_to_json's int() coercion
        obj = {**plan_to_json(obj), "keep": dict(obj.keep), "kept_indices": dict(obj.kept_indices)}
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as exc:
            raise PlanError(f"The channel plan is not valid JSON ({exc}).") from exc
    if not isinstance(obj, Mapping):
        raise PlanError(f"A channel plan must be a JSON object, got {type(obj).__name__}.")
    if obj.get("kind") != PLAN_KIND:
        raise PlanError(f"plan.kind is {obj.get('kind')!r}, expected {PLAN_KIND!r}.")
    version = obj.get("version")
    if not _is_int(version) or not 1 <= version <= PLAN_VERSION:
        raise PlanError(f"plan.version {version!r} is not supported (this squeeze reads 1..{PLAN_VERSION}).",
                        "Upgrade squeeze to replay plans written by a newer version.")
    round_to = obj.get("round_to", 8)
    if not _is_int(round_to) or round_to < 1:
        raise PlanError(f"plan.round_to must be an integer >= 1, got {round_to!r}.")
    keep = _parse_keep(obj.get("keep"))
    kept = _parse_kept_indices(obj.get("kept_indices"), keep)
    return ChannelPlan(keep, kept, round_to=round_to, importance=str(obj.get("importance", "l1")))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_keep(keep: Any) -> dict[str, int]:
    if not isinstance(keep, Mapping):
        raise PlanError("plan.keep must be an object {layer name: channels to keep}.")
    for name, k in keep.items():
        if not _is_int(k) or k <= 0:
            raise PlanError(f"plan.keep[{name!r}] must be a positive integer, got {k!r}.")
    return {str(name): int(k) for name, k in keep.items()}


def _parse_kept_indices(kept: Any, keep: dict[str, int]) -> dict[str, list[int]]:
    if not isinstance(kept, Mapping):
        raise PlanError("plan.kept_indices must be an object {layer name: [channel indices]}.")
    if set(kept) != set(keep):
        diff = sorted(set(kept) ^ set(keep))
        raise PlanError(f"plan.keep and plan.kept_indices name different layers: {', '.join(diff)}.")
    out = {}
    for name, idxs in kept.items():
        ok = isinstance(idxs, list) and all(_is_int(i) and i >= 0 for i in idxs)
        if not ok or idxs != sorted(set(idxs)):
            raise PlanError(f"plan.kept_indices[{name!r}] must be sorted, distinct channel indices >= 0.")
        if len(idxs) != keep[name]:
            raise PlanError(f"plan.kept_indices[{name!r}] lists {len(idxs)} channels but plan.keep says {keep[name]}.")
        out[str(name)] = list(idxs)
    return out


def round_width(target: int, width: int, round_to: int = 8, step: int = 1) -> int:
    """Round a channel count UP to a multiple of round_to (and of `step`), within [unit, width].

    `step` is the channel granularity a group imposes (grouped convs need the same count per group).
    """
    unit = math.lcm(max(1, round_to), max(1, step))
    return min(width, max(unit, math.ceil(target / unit) * unit))


def compose_plans(first: ChannelPlan, then: ChannelPlan) -> ChannelPlan:
    """One plan on the original model equal to applying `first`, then `then` on its result.

    `then`'s indices count the channels left by `first`, so they map through first.kept_indices.
    (Iterative searches prune step by step; the report and checkpoint keep one plan.)
    """
    keep = {**first.keep, **then.keep}
    kept = dict(first.kept_indices)
    for name, idxs in then.kept_indices.items():
        base = first.kept_indices.get(name)
        kept[name] = list(idxs) if base is None else [base[i] for i in idxs]
    return ChannelPlan(keep, kept, round_to=then.round_to, importance=then.importance)


def unknown_layer_error(name: str, table: LayerTable) -> PlanError:
    """PlanError for a name that is not a prunable layer: says what it is, lists the valid names."""
    valid = table.names()
    owner = table.root_of(name)
    if owner is not None:
        return PlanError(f"Layer {name!r} is pruned together with {owner!r} (coupled channels).",
                         f"Set the width on {owner!r}.")
    if name in table.names(prunable_only=False):
        return PlanError(f"Layer {name!r} cannot be pruned: {table[name].reason}.")
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(valid[:24]) + (f", ... ({len(valid) - 24} more)" if len(valid) > 24 else "")
    return PlanError(f"Unknown prunable layer {name!r}.{hint}", f"Prunable layers: {shown or '(none)'}.")


def check_plan(plan: ChannelPlan, table: LayerTable) -> None:
    """Check a plan against the model it is applied to: known layers, widths, indices in range."""
    for name, k in plan.keep.items():
        if name not in table or not table[name].prunable:
            raise unknown_layer_error(name, table)
        layer = table[name]
        if k > layer.out_channels:
            raise PlanError(f"plan.keep[{name!r}] = {k} exceeds the layer's {layer.out_channels} channels.")
        if k % layer.channel_step:
            raise PlanError(f"plan.keep[{name!r}] = {k} is not a multiple of {layer.channel_step}: grouped "
                            "convs in its group need the same number of channels in every group.")
        idxs = plan.kept_indices[name]
        if idxs and idxs[-1] >= layer.out_channels:
            raise PlanError(f"plan.kept_indices[{name!r}] has channel {idxs[-1]}, but the layer has "
                            f"{layer.out_channels} channels (0..{layer.out_channels - 1}).")
        _check_repeated_positions(name, idxs, layer.out_channels, layer.channel_step)


def _check_repeated_positions(name: str, idxs: list[int], width: int, step: int) -> None:
    """Grouped convs: every block of width/step channels must keep the same positions."""
    if step == 1:
        return
    block = width // step
    positions = [{i - b * block for i in idxs if b * block <= i < (b + 1) * block} for b in range(step)]
    if any(p != positions[0] for p in positions):
        raise PlanError(f"plan.kept_indices[{name!r}] keeps different channels in the {step} channel groups; "
                        "grouped convs need the same positions kept in every group.")
