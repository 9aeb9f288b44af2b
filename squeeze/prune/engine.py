"""Channel pruning: make a plan from target widths (scoring), apply a plan (surgery).

    table = prunable_layers(model, x)                    # groups, widths, shapes
    plan = make_plan(model, x, {"stem.0.0": 32})          # or keep=0.5 for every layer
    pruned = apply_plan(model, plan, x)                   # a pruned deep copy

Surgery is torch-pruning's: for each planned root, the complement of its kept channels is pruned
through the dependency graph, so coupled convs, BatchNorms, depthwise convs, concat slices and the
consumers' input channels shrink together. A pruned net computes exactly what the unpruned net
computes with those channels' outputs zeroed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from squeeze.errors import first_line
from squeeze.model.loading import register_plan_kind
from squeeze.prune.graph import (
    Coupling,
    LayerTable,
    flatten_tensors,
    frozen_index_mapping,
    out_pruning_fn,
    trace_coupling,
)
from squeeze.prune.importance import Criterion, get_importance
from squeeze.prune.plan import (
    PLAN_KIND,
    ChannelPlan,
    PlanError,
    PruneError,
    check_plan,
    plan_from_json,
    round_width,
    unknown_layer_error,
)

__all__ = ["apply_plan", "make_plan", "replay_channel_plan", "select_channels", "target_widths", "uniform_plan"]


# --- planning (scoring) ----------------------------------------------------------------------------


def make_plan(
    module: nn.Module,
    example_input: torch.Tensor,
    keep: Mapping[str, int] | float,
    importance: str = "l1",
    round_to: int = 8,
    data: Any = None,
) -> ChannelPlan:
    """Choose the channels to keep for target widths; the module is not modified.

    keep: {layer name: channels} (layers left out keep all), or one ratio in (0, 1] for every
    prunable layer. Widths are rounded UP to a multiple of round_to (1 = exact), never below
    round_to, never above the current width. `data`: (x, y) batch(es), needed by "taylor".
    """
    criterion = get_importance(importance)
    if criterion.needs_data and data is None:
        raise PruneError(f"The {importance!r} importance needs labelled data to compute gradients.",
                         "Pass data=(inputs, labels) (or an iterable of such batches), or use l1, l2 or bn_scale.")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise PlanError(f"round_to must be an integer >= 1, got {round_to!r}.")
    coupling = trace_coupling(copy.deepcopy(module), example_input)
    targets = target_widths(coupling.table, keep, round_to)
    if targets and criterion.needs_data:
        criterion.prepare(coupling.module, data)
    kept = {name: _kept_channels(criterion, coupling, name, k) for name, k in targets.items()}
    return ChannelPlan(targets, kept, round_to=round_to, importance=importance)


def uniform_plan(
    module: nn.Module,
    example_input: torch.Tensor,
    ratio: float,
    round_to: int = 8,
    importance: str = "l1",
    data: Any = None,
) -> ChannelPlan:
    """The baseline: keep the same fraction of channels in every prunable layer."""
    return make_plan(module, example_input, ratio, importance=importance, round_to=round_to, data=data)


def target_widths(table: LayerTable, keep: Mapping[str, int] | float, round_to: int) -> dict[str, int]:
    """Rounded widths of the layers that actually shrink, in table order."""
    requested = _requested_widths(table, keep)
    out = {}
    for layer in table:
        if layer.name not in requested:
            continue
        k = requested[layer.name]
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise PlanError(f"keep[{layer.name!r}] must be a positive number of channels, got {k!r}.")
        if k > layer.out_channels:
            raise PlanError(f"keep[{layer.name!r}] = {k} is more than the layer's {layer.out_channels} channels.",
                            "Pruning only removes channels; give at most the current width.")
        k = round_width(k, layer.out_channels, round_to, layer.channel_step)
        if k < layer.out_channels:
            out[layer.name] = k
    return out


def _requested_widths(table: LayerTable, keep: Mapping[str, int] | float) -> dict[str, int]:
    if isinstance(keep, Mapping):
        for name in keep:
            if name not in table or not table[name].prunable:
                raise unknown_layer_error(name, table)
        return dict(keep)
    if isinstance(keep, Real) and not isinstance(keep, bool):
        if not 0 < keep <= 1:
            raise PlanError(f"A keep ratio must be in (0, 1], got {keep!r}.")
        # round() first so 0.3 * 40 = 12.000000000000002 does not become 13
        return {layer.name: max(1, math.ceil(round(layer.out_channels * keep, 6))) for layer in table if layer.prunable}
    raise PlanError(f"keep must be {{layer name: channels}} or a ratio in (0, 1], got {type(keep).__name__}.")


def _kept_channels(criterion: Criterion, coupling: Coupling, name: str, keep: int) -> list[int]:
    scores = criterion.score(coupling.groups[name])
    if scores is None:
        raise PruneError(f"The {criterion.name!r} importance has nothing to score in layer {name!r}'s group "
                         "(e.g. bn_scale with no BatchNorm).", "Choose another importance criterion.")
    return select_channels(scores, keep, coupling.table[name].channel_step)


def select_channels(scores: torch.Tensor, keep: int, step: int = 1) -> list[int]:
    """Sorted indices of the `keep` highest-scoring channels (ties: lower index first).

    step > 1 (grouped convs): scores (width,) are seen as (step, width/step) blocks; the same
    keep/step positions are kept in every block, ranked by their mean score over the blocks.
    """
    width = scores.numel()
    block = width // step
    per_position = scores.reshape(step, block).mean(0)  # (block,)
    best = torch.sort(per_position, descending=True, stable=True).indices[: keep // step]
    return sorted(int(p) + b * block for b in range(step) for p in best.tolist())


# --- applying (surgery) ----------------------------------------------------------------------------


def apply_plan(
    module: nn.Module, plan: ChannelPlan | Mapping[str, Any] | str, example_input: torch.Tensor
) -> nn.Module:
    """A pruned deep copy of `module`: each planned layer keeps exactly plan.kept_indices[layer]."""
    return _prune_in_place(copy.deepcopy(module), plan_from_json(plan), example_input)


@register_plan_kind(PLAN_KIND)
def replay_channel_plan(module: nn.Module, plan: Mapping[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """Checkpoint loading: prune the freshly built architecture in place before its state_dict loads."""
    return _prune_in_place(module, plan_from_json(plan), torch.zeros(tuple(input_shape)))


def _prune_in_place(module: nn.Module, plan: ChannelPlan, x: torch.Tensor) -> nn.Module:
    requires_grad = {n: p.requires_grad for n, p in module.named_parameters()}
    coupling = trace_coupling(module, x)
    check_plan(plan, coupling.table)
    training = module.training
    module.eval()
    try:
        _prune_groups(coupling, plan)
    finally:
        module.train(training)
    # torch-pruning replaces pruned tensors by new Parameters (requires_grad=True): restore frozen ones
    for n, p in module.named_parameters():
        p.requires_grad_(requires_grad.get(n, True))
    _verify(module, plan, coupling, x)
    return module


def _prune_groups(coupling: Coupling, plan: ChannelPlan) -> None:
    """Prune every planned group in one pass, all indices taken on the unpruned graph.

    Each planned root's group (get_pruning_group with the complement of its kept channels) lists
    (layer, pruning function, indices); groups that touch the same layer (DenseNet: every conv
    reading a concatenation) have their indices merged, and each layer is cut once. This equals
    pruning the groups one after another, without recomputing concat offsets after each cut.
    """
    graph = coupling.graph
    merged: dict[tuple, tuple[Any, set[int]]] = {}  # (target node, handler) -> (dependency, indices)
    with frozen_index_mapping(graph):
        for layer in coupling.table:
            if layer.name not in plan.keep:
                continue
            drop = sorted(set(range(layer.out_channels)) - set(plan.kept_indices[layer.name]))
            root = coupling.roots[layer.name]
            group = graph.get_pruning_group(root, out_pruning_fn(root), drop)
            if not graph.check_pruning_group(group):
                raise PlanError(f"Pruning {len(drop)} of {layer.out_channels} channels of {layer.name!r} "
                                "would leave a coupled layer without channels.")
            for item in group:
                merged.setdefault((item.dep.target, item.dep.handler), (item.dep, set()))[1].update(item.idxs)
    combined = tp.dependency.Group()
    combined._DG = graph  # Group.prune reaches the graph for parameter-type targets
    for dep, idxs in merged.values():
        combined.add_dep(dep, sorted(idxs))
    if not graph.check_pruning_group(combined):
        raise PlanError("The plan would leave a layer without input channels.")
    combined.prune(record_history=False)


def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _verify(module: nn.Module, plan: ChannelPlan, coupling: Coupling, x: torch.Tensor) -> None:
    """Exact widths for every planned root and its coupled layers; same output shapes as before."""
    for name, k in plan.keep.items():
        for member in (name, *coupling.table[name].coupled):
            got = _width(module.get_submodule(member))
            if got != k:
                raise PruneError(f"After pruning, {member} has {got} output channels instead of {k}.")
    try:
        with torch.no_grad():
            shapes = [tuple(t.shape) for t in flatten_tensors(module.eval()(x))]
    except Exception as exc:
        raise PruneError(f"Pruning {', '.join(plan.keep)} broke the model's forward pass ({first_line(exc)}).",
                         "The graph missed a coupling (e.g. an add with the model input or a buffer); "
                         "leave these layers out of the plan.") from exc
    finally:
        module.train(coupling.training)
    if shapes != coupling.output_shapes:
        raise PruneError(f"Pruning changed the model output shapes from {coupling.output_shapes} to {shapes}.")

