"""NetAdapt (Yang et al., ECCV 2018): iterative, resource-driven channel pruning.

Iteration i asks for resource R_i = R_{i-1} - r0 * R_0 * decay^i (never below the budget). Each prunable
group proposes the largest width on the rounding grid whose network meets R_i (found by bisection: the
resource is monotone in the width), keeping the channels the importance criterion ranks highest. With
data, each proposal is fine-tuned briefly and evaluated on the held-out split, and the best one is kept
(by accuracy, or by the smallest accuracy drop per unit of resource saved). Without data, the proposal
that keeps the largest fraction of its group's original channels wins: the layer that gives up the
fewest channels for the same saving. After the budget is met (measured, for latency), a long-term
fine-tune follows.

Measured latency is noisy and, under load, not monotone in the width. So: readings are ratios to the
original timed interleaved, sampled until their interval is narrower than the iteration's step; before
the search, the smallest allowed model (every group at its minimum width) is measured once and a budget
below it is refused; when no proposal reads under an iteration's target, every group steps one grid width
down and the best of those is taken, so a high reading slows the search but never ends it. A budget is
called unreachable only when every group is at its minimum width and that model measures above it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from squeeze.model import LoadedModel
from squeeze.prune.budget import BudgetError, Resource, ResolvedBudget, check_reachable, confirm_floor
from squeeze.prune.engine import apply_plan, make_plan
from squeeze.prune.graph import prunable_layers
from squeeze.prune.plan import ChannelPlan, compose_plans, plan_to_json, round_width

if TYPE_CHECKING:
    from squeeze.data import DataBundle
    from squeeze.passes.prune import NetAdaptOptions

__all__ = ["Candidate", "IterationRecord", "SearchResult", "netadapt", "pruned_candidate", "smallest_model",
           "taylor_batch", "finish", "width_grid"]

SMALLEST = "every prunable group at its minimum width"


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

    @property
    def budget_met(self) -> bool | None:
        """Within 2% of the budget: latency readings of the same model vary about that much."""
        return None if self.final_measured is None else self.final_measured <= 1.02 * self.budget.target

    def to_json(self) -> dict[str, Any]:
        return {"budget": asdict(self.budget), "final_measured": self.final_measured, "budget_met": self.budget_met,
                "search_seconds": round(self.search_seconds, 2), "history": [asdict(h) for h in self.history]}


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


class _Proposals:
    """One NetAdapt iteration's proposals from the current model."""

    def __init__(self, current: Candidate, original_widths: dict[str, int], resource: Resource,
                 opts: NetAdaptOptions, data: DataBundle | None) -> None:
        self.current, self.original_widths, self.resource, self.opts, self.data = (
            current, original_widths, resource, opts, data)
        self.batch = taylor_batch(data, opts.importance)
        self.built: dict[tuple[str, int], Candidate] = {}
        self.price = resource.width_predictor(current.model) or self._build_and_price

    def candidate(self, layer: str, width: int) -> Candidate:
        if (layer, width) not in self.built:
            model, plan = pruned_candidate(self.current.model, self.current.plan, {layer: width},
                                           self.opts.importance, self.opts.round_to, self.batch)
            self.built[layer, width] = Candidate(model, plan, self.resource.of(model), layer, width)
        return self.built[layer, width]

    def _build_and_price(self, proposals: list[tuple[str, int]]) -> list[float]:
        return [self.candidate(layer, width).resource for layer, width in proposals]

    def largest_widths(self, layers, target: float) -> dict[str, tuple[int, float]]:
        """Per layer, the largest width on the grid whose network meets `target`, and its resource.

        Bisection over grid positions (the resource falls with the width), all layers in step, so that a
        lookup table measures the entries one step misses in one batch.
        """
        grids = {layer.name: width_grid(layer, self.opts.round_to) for layer in layers}
        bounds = {name: (0, len(g) - 1) for name, g in grids.items()}
        best: dict[str, tuple[int, float]] = {}
        while bounds:
            mids = {name: (lo + hi) // 2 for name, (lo, hi) in bounds.items()}
            values = self.price([(name, grids[name][mid]) for name, mid in mids.items()])
            for (name, mid), value in zip(mids.items(), values):
                lo, hi = bounds[name]
                if value <= target:
                    best[name], lo = (grids[name][mid], value), mid + 1
                else:
                    hi = mid - 1
                bounds[name] = (lo, hi)
            bounds = {name: b for name, b in bounds.items() if b[0] <= b[1]}
        return best

    def one_step_down(self, layers) -> dict[str, tuple[int, float]]:
        """Per layer, the next width down its grid and its resource: the way on when no proposal read under
        the target (readings of a busy machine can all come out high at once; this one is not believed)."""
        steps = [(layer.name, width_grid(layer, self.opts.round_to)[-1]) for layer in layers]
        return {name: (width, value) for (name, width), value in zip(steps, self.price(steps))}

    def evaluate(self, cand: Candidate) -> Candidate:
        from squeeze.train import evaluate, fine_tune

        fine_tune(cand.model.module, self.data.train, self.opts.short_term, progress=False)
        cand.accuracy = evaluate(cand.model.module, self.data.val).top1
        if self.opts.select == "accuracy":
            cand.score = cand.accuracy
        else:  # smallest accuracy drop per unit of resource saved
            saved = max(self.current.resource - cand.resource, 1e-12)
            cand.score = -(self.current.accuracy - cand.accuracy) / saved
        return cand

    def choose(self, widths: dict[str, tuple[int, float]]) -> tuple[Candidate, list[dict[str, Any]]]:
        """The winning proposal (built) and a record of every proposal.

        Without data, the proposal keeping the largest fraction of its group's original channels wins,
        so only the winner is built; with data, each is built, fine-tuned briefly and evaluated.
        """
        if self.data is None:
            scored = {name: (w / self.original_widths[name], -value) for name, (w, value) in widths.items()}
            name = max(scored, key=scored.get)
            best = self.candidate(name, widths[name][0])
            best.score = scored[name][0]
            records = [{"layer": n, "width": w, "resource": v, "accuracy": None, "score": scored[n][0]}
                       for n, (w, v) in widths.items()]
            return best, records
        props = [self.evaluate(self.candidate(name, w)) for name, (w, _) in widths.items()]
        best = max(props, key=lambda c: (c.score, -c.resource))
        return best, [{"layer": p.layer, "width": p.width, "resource": p.resource, "accuracy": p.accuracy,
                       "score": p.score} for p in props]


def _record(i: int, target: float, best: Candidate, proposals: list[dict[str, Any]], measured,
            layer_widths: dict[str, int], t0: float) -> IterationRecord:
    return IterationRecord(i, target, best.layer, layer_widths[best.layer], best.width, best.resource, measured,
                           best.accuracy, proposals, round(time.perf_counter() - t0, 2))


def _widths_for_step(proposals: _Proposals, layers, current: float, step: float, budget: ResolvedBudget,
                     opts: NetAdaptOptions) -> tuple[float, dict[str, tuple[int, float]]]:
    """This iteration's target and proposals. A step no single layer can save is halved (down to 1% of the
    first step); when none meets even that, every layer one grid width down."""
    resolution = step  # halving the step must not multiply the samples per reading
    while True:
        target = max(current - step, budget.target)
        proposals.resource.set_resolution(resolution, target)
        found = proposals.largest_widths(layers, target)
        if found:
            return target, found
        if step < 0.01 * opts.initial_reduction * budget.original:
            return target, proposals.one_step_down(layers)
        step /= 2


def netadapt(original: LoadedModel, budget: ResolvedBudget, resource: Resource, opts: NetAdaptOptions,
             data: DataBundle | None = None, recalibrate: Callable[[LoadedModel], float] | None = None,
             log: Callable[[str], None] = lambda _msg: None) -> SearchResult:
    """Prune `original` until `budget` is met; `recalibrate(model)` (table oracles) re-fits the table."""
    t_start = time.perf_counter()
    x = original.example_input()
    original_widths = prunable_layers(original.module, x).widths()
    check_reachable("NetAdapt", smallest_model(original, opts.round_to), budget, resource, SMALLEST)
    current = Candidate(original, None, budget.original)
    if data is not None:
        from squeeze.train import evaluate

        current.accuracy = evaluate(original.module, data.val).top1
    result = SearchResult(original, budget)
    confirm = recalibrate or resource.confirm
    for i in range(opts.max_iterations):
        t0 = time.perf_counter()
        table = prunable_layers(current.model.module, x)
        layers = shrinkable(table, opts.round_to)
        if not layers:  # every group at its minimum width: the floor itself decides
            current.resource = confirm_floor("NetAdapt", current.model, budget, resource, SMALLEST)
            break
        step = opts.initial_reduction * budget.original * opts.decay ** i
        proposals = _Proposals(current, original_widths, resource, opts, data)
        target, widths_found = _widths_for_step(proposals, layers, current.resource, step, budget, opts)
        best, records = proposals.choose(widths_found)
        measured = None
        due = opts.latency_source == "table+recalibrate" and (i + 1) % opts.recalibrate_every == 0
        if budget.resource == "latency_ms" and (due or best.resource <= budget.target):
            # The reading that picked the winner is biased low (the minimum of noisy readings): measure again
            # before believing the budget is met.
            resource.set_resolution(step, budget.target)
            measured = confirm(best.model)
            best.resource = measured
        widths = table.widths()
        result.history.append(_record(i, target, best, records, measured, widths, t0))
        log(f"iteration {i}: {best.layer} {widths[best.layer]} -> {best.width}, {budget.resource} "
            f"{best.resource:.4g} (target {target:.4g})" + (f", val top-1 {best.accuracy:.4f}" if data else ""))
        current = best
        if current.resource <= budget.target:
            break
    else:
        raise BudgetError(f"NetAdapt stopped after {opts.max_iterations} iterations at {current.resource:.4g} "
                          f"{budget.resource} (budget {budget.target:.4g}).", "Raise max_iterations or initial_reduction.")
    result.model = current.model
    result.search_seconds = time.perf_counter() - t_start
    return result


def finish(result: SearchResult, resource: Resource, opts, data: DataBundle | None, teacher=None) -> SearchResult:
    """Long-term fine-tune (with data), then the measured/counted resource of the final model."""
    if data is not None:
        from squeeze.train import fine_tune

        fine_tune(result.model.module, data.train, opts.long_term, teacher=teacher, progress=True)
    result.final_measured = resource.confirm(result.model)
    return result
