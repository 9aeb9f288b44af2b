"""What every pruning search shares: candidates and their records, the search result, the helpers that build
and bound candidates, and the harness that runs a search as a pass (latency oracle, budget, long-term fine-tune,
the record in the report). A search itself is a method module (squeeze/methods/prune/)."""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from squeeze.measure.lut import LatencyTable, TableOracle
from squeeze.measure.oracle import RelativeOracle
from squeeze.measure.protocol import LATENCY_TOLERANCE
from squeeze.model.loading import LoadedModel
from squeeze.prune.budget import BudgetError, Resource, ResolvedBudget, budget_resource, resolve_budget
from squeeze.prune.engine import apply_plan, make_plan
from squeeze.prune.graph import prunable_layers
from squeeze.prune.plan import ChannelPlan, compose_plans, plan_to_json, round_width

if TYPE_CHECKING:
    from squeeze.data import DataBundle
    from squeeze.methods.base import ModelState, PassContext
    from squeeze.methods.prune import PruneOptions

__all__ = ["Candidate", "IterationRecord", "SearchResult", "Search", "pruned_candidate", "smallest_model",
           "taylor_batch", "finish", "width_grid", "shrinkable", "replayed_model", "run_pruning_search", "SMALLEST"]

log = logging.getLogger("squeeze.prune")

SMALLEST = "every prunable group at its minimum width"

# A search: (original, budget, resource, data, recalibrate, log) -> SearchResult.
Search = Callable[[LoadedModel, ResolvedBudget, Resource, "DataBundle | None", Any, Callable[[str], None]],
                  "SearchResult"]


@dataclass
class Candidate:
    model: LoadedModel  # pruned module; model.plans holds the one plan composed on the original
    plan: ChannelPlan | None
    resource: float
    layer: str | None = None
    width: int | None = None
    accuracy: float | None = None
    score: float | None = None


@dataclass
class IterationRecord:
    iteration: int
    target: float
    layer: str
    width_before: int
    width_after: int
    resource: float
    measured: float | None
    accuracy: float | None
    proposals: list[dict[str, Any]]
    seconds: float


@dataclass
class SearchResult:
    model: LoadedModel
    budget: ResolvedBudget
    history: list[IterationRecord] = field(default_factory=list)
    final_measured: float | None = None
    search_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # a search's own record entries (AMC: ratios, rewards)
    # Group widths of the result, from a search whose result renames layers (MDP wraps a conv at a lower resolution)
    widths_after: dict[str, int] | None = None

    @property
    def budget_met(self) -> bool | None:
        """Within LATENCY_TOLERANCE of the budget: latency readings of the same model vary about that much."""
        return None if self.final_measured is None else self.final_measured <= LATENCY_TOLERANCE * self.budget.target

    def to_json(self) -> dict[str, Any]:
        return {"budget": asdict(self.budget), "final_measured": self.final_measured, "budget_met": self.budget_met,
                "search_seconds": round(self.search_seconds, 2), "history": [asdict(h) for h in self.history],
                **self.extra}


def pruned_candidate(base: LoadedModel, base_plan: ChannelPlan | None, keep: dict[str, int] | float,
                     importance: str, round_to: int, data_batch=None) -> tuple[LoadedModel, ChannelPlan]:
    """`base` pruned to `keep`, as a LoadedModel whose plan is composed onto the original architecture."""
    x = base.example_input()
    plan = make_plan(base.module, x, keep, importance=importance, round_to=round_to, data=data_batch)
    module = apply_plan(base.module, plan, x)
    total = plan if base_plan is None else compose_plans(base_plan, plan)
    # Plans the input model already carried (a pruned checkpoint pruned again) are replayed first.
    earlier = base.plans if base_plan is None else base.plans[:-1]
    model = LoadedModel(base.name, base.kind, base.input_shape, module, arch=base.arch,
                        plans=[*earlier, plan_to_json(total)], metadata=dict(base.metadata))
    return model, total


def replayed_model(original: LoadedModel, plan: ChannelPlan, state_dict: dict[str, torch.Tensor]) -> LoadedModel:
    """`original` pruned by `plan` (composed on it) with `state_dict` loaded: what `pruned_candidate` built step
    by step, rebuilt from a saved plan and weights."""
    module = apply_plan(original.module, plan, original.example_input())
    module.load_state_dict(state_dict)
    return LoadedModel(original.name, original.kind, original.input_shape, module, arch=original.arch,
                       plans=[*original.plans, plan_to_json(plan)], metadata=dict(original.metadata))


def taylor_batch(data: DataBundle | None, importance: str, n: int = 256):
    if importance != "taylor":
        return None
    if data is None:
        raise BudgetError("The taylor importance needs data.", "Pass --data, or use --importance l1.")
    xs, ys = zip(*(data.train[i] for i in range(min(n, len(data.train)))))
    return torch.stack(xs), torch.tensor(ys)


def width_grid(layer, round_to: int) -> list[int]:
    """The widths below the layer's current one that a search may give it, ascending."""
    step = max(1, round_to)
    grid = {round_width(w, layer.out_channels, round_to, layer.channel_step) for w in range(step, layer.out_channels, step)}
    return sorted(w for w in grid if w < layer.out_channels)


def shrinkable(table, round_to: int) -> list:
    """The prunable groups of `table` that are not yet at their minimum width."""
    return [layer for layer in table if layer.prunable and width_grid(layer, round_to)]


def smallest_model(original: LoadedModel, round_to: int) -> LoadedModel:
    """Every prunable group at the smallest width of its grid: no search step goes below this model.
    (Which channels are kept does not change its latency, MACs or size, so L1 picks them.)"""
    layers = shrinkable(prunable_layers(original.module, original.example_input()), round_to)
    return pruned_candidate(original, None, {g.name: width_grid(g, round_to)[0] for g in layers}, "l1", round_to)[0]


def finish(result: SearchResult, resource: Resource, opts, data: DataBundle | None, teacher=None) -> SearchResult:
    """Long-term fine-tune (with data), then the measured/counted resource of the final model."""
    if data is not None:
        from squeeze.train import fine_tune

        fine_tune(result.model.module, data.train, opts.long_term, teacher=teacher, progress=True)
    result.final_measured = resource.confirm(result.model)
    return result


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
    table_oracle = TableOracle(LatencyTable(ctx.target, batch_size=ctx.protocol.batch_size), original, measured)
    return Resource(name, table_oracle, measured), table_oracle.recalibrate, source


def run_pruning_search(state: ModelState, ctx: PassContext, opts: PruneOptions, name: str,
                       search: Search) -> tuple[ModelState, dict[str, Any]]:
    """Run `search` (named `name` in the report) under the recipe's budget, then fine-tune and confirm. A
    resumable pass (given `ctx.checkpoint`) has a search taking `progress` (squeeze.prune.resume.SearchProgress)."""
    original = state.model
    resource, recalibrate, source = _resource(ctx, original, opts)
    if source != "counted":  # NetAdapt re-fits the table every few steps only if it sees what `auto` chose
        opts = opts.model_copy(update={"latency_source": source})
    budget = resolve_budget(ctx.budget, original, resource)
    if ctx.checkpoint is not None:
        from squeeze.prune.resume import SearchProgress

        table = resource.oracle if isinstance(resource.oracle, TableOracle) else None
        progress = SearchProgress(ctx.checkpoint, table)
        budget = progress.budget(budget)
        search = functools.partial(search, progress=progress)
    log.info(f"{name}: {budget.resource} {budget.original:.4g} -> budget {budget.target:.4g} "
             f"({100 * budget.ratio:.0f}%), latency from {source}")
    result = search(original, budget, resource, ctx.data, recalibrate, log.info)
    finish(result, resource, opts, ctx.data, teacher=original.module if opts.distill else None)
    if not result.budget_met:
        log.warning(f"the final measurement ({result.final_measured:.4g} {budget.resource}) is above the budget "
                    f"({budget.target:.4g}); the report says so")
    x = original.example_input()
    table = prunable_layers(original.module, x)
    widths_before = table.widths()
    log.info("not pruned: " + "; ".join(f"{name} ({why})" for name, why in table.not_pruned().items()))
    widths_after = result.widths_after or prunable_layers(result.model.module, x).widths()
    state.model, state.artifact = result.model, None
    record = {
        "search": name,
        "latency_source": source,
        **result.to_json(),
        "widths": {name: [w, widths_after.get(name, w)] for name, w in widths_before.items()},
        "not_pruned": table.not_pruned(),  # layer -> why its output channels stay (classifier, shuffle...)
        "plan": result.model.plans[-1],
    }
    fastest = getattr(resource.measured, "fastest_ms", None)  # a RelativeOracle's: the machine at its quietest
    if isinstance(fastest, float):
        record["original_fastest_ms"] = fastest  # for the final verdict's contention check
    proxy = getattr(opts, "proxy", None)
    if proxy is not None and ctx.data is not None:  # the proxy the candidates were scored with, and its last check
        from squeeze.prune.proxy import last_rho, rho_key

        record["proxy"] = {"label": proxy.label(), **proxy.model_dump(),
                           "last_rho": last_rho(rho_key(original.name, ctx.data.spec, name), proxy)}
    return state, record
