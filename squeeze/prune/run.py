"""Running a pruning search as a pass: choose the latency oracle, resolve the budget, search, fine-tune."""

from __future__ import annotations

import logging
from typing import Any

from squeeze.measure.lut import LatencyTable, TableOracle
from squeeze.measure.oracle import RelativeOracle
from squeeze.passes.base import ModelState, PassContext
from squeeze.prune.budget import Resource, budget_resource, resolve_budget
from squeeze.prune.graph import prunable_layers
from squeeze.prune.netadapt import finish, netadapt
from squeeze.prune.uniform import uniform

__all__ = ["run_pruning_search"]

log = logging.getLogger("squeeze.prune")


# Below this latency, per-call overheads swamp the per-layer figures of a lookup table.
TABLE_MIN_MS = 1.0


def _resource(ctx: PassContext, original, opts) -> tuple[Resource, Any, str]:
    """The resource model, the function that re-fits a table to a measurement (or None), and the source used."""
    name = budget_resource(ctx.budget)
    if name != "latency_ms":
        return Resource(name), None, "counted"
    measured = RelativeOracle(original, ctx.target, ctx.protocol)
    source = opts.latency_source
    if source == "auto":
        source = "measured" if measured.reference_ms < TABLE_MIN_MS else "table+recalibrate"
    if source == "measured":
        return Resource(name, measured, measured), None, source
    table_oracle = TableOracle(LatencyTable(ctx.target), original, measured)
    return Resource(name, table_oracle, measured), table_oracle.recalibrate, source


def run_pruning_search(state: ModelState, ctx: PassContext, opts, search: str) -> tuple[ModelState, dict[str, Any]]:
    original = state.model
    resource, recalibrate, source = _resource(ctx, original, opts)
    if source != "counted":  # NetAdapt re-fits the table every few steps only if it sees what `auto` chose
        opts = opts.model_copy(update={"latency_source": source})
    budget = resolve_budget(ctx.budget, original, resource)
    log.info(f"{search}: {budget.resource} {budget.original:.4g} -> budget {budget.target:.4g} "
             f"({100 * budget.ratio:.0f}%), latency from {source}")
    if search == "netadapt":
        result = netadapt(original, budget, resource, opts, ctx.data, recalibrate, log.info)
    else:
        result = uniform(original, budget, resource, opts, recalibrate, log.info, ctx.data)
    finish(result, resource, opts, ctx.data, teacher=original.module if opts.distill else None)
    if not result.budget_met:
        log.warning(f"the final measurement ({result.final_measured:.4g} {budget.resource}) is above the budget "
                    f"({budget.target:.4g}); the report says so")
    x = original.example_input()
    table = prunable_layers(original.module, x)
    widths_before = table.widths()
    log.info("not pruned: " + "; ".join(f"{name} ({why})" for name, why in table.not_pruned().items()))
    widths_after = prunable_layers(result.model.module, x).widths()
    state.model, state.artifact = result.model, None
    record = {
        "search": search,
        "latency_source": source,
        **result.to_json(),
        "widths": {name: [w, widths_after.get(name, w)] for name, w in widths_before.items()},
        "not_pruned": table.not_pruned(),  # layer -> why its output channels stay (classifier, shuffle...)
        "plan": result.model.plans[-1],
    }
    return state, record
