"""The baseline: the same keep ratio in every prunable layer (L1 by default), bisected to meet the budget.

The smallest allowed model (every layer at `min_ratio`) is measured before the bisection, and a budget
below it refused; when no ratio reads under the budget, that model is measured again and taken if it
meets it: the budget is called unreachable only on that model's reading.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from pydantic import Field

from squeeze.methods.base import register_pass
from squeeze.methods.prune import PruneOptions, PruneSearch

if TYPE_CHECKING:
    from squeeze.data import DataBundle
    from squeeze.model.loading import LoadedModel
    from squeeze.prune.budget import Resource, ResolvedBudget
    from squeeze.prune.search import Candidate, SearchResult

__all__ = ["UniformOptions", "UniformPass", "uniform"]


class UniformOptions(PruneOptions):
    min_ratio: float = Field(0.05, gt=0, lt=1)
    bisection_steps: int = Field(10, ge=1)


@register_pass
class UniformPass(PruneSearch):
    name = "prune.uniform"
    summary = "Baseline: the same channel ratio in every layer, bisected to meet the budget."
    Options = UniformOptions
    smoke_options = {"bisection_steps": 4, "long_term": {"iterations": 2}}

    def search(self, original, budget, resource, data, recalibrate, log) -> SearchResult:
        return uniform(original, budget, resource, self.options, recalibrate, log, data)


def uniform(original: LoadedModel, budget: ResolvedBudget, resource: Resource, opts: UniformOptions,
            recalibrate: Callable[[LoadedModel], float] | None = None,
            log: Callable[[str], None] = lambda _msg: None, data: DataBundle | None = None) -> SearchResult:
    """Largest ratio whose pruned network meets the budget (confirmed by measurement for latency)."""
    from squeeze.prune.budget import FLOOR_RESOLUTION, check_reachable, confirm_floor
    from squeeze.prune.search import Candidate, IterationRecord, SearchResult, pruned_candidate, taylor_batch

    t_start = time.perf_counter()
    lo, hi = opts.min_ratio, 1.0
    best: Candidate | None = None
    result = SearchResult(original, budget)
    batch = taylor_batch(data, opts.importance)
    smallest = f"every layer at keep ratio {opts.min_ratio}"
    floor, _ = pruned_candidate(original, None, opts.min_ratio, opts.importance, opts.round_to, batch)
    check_reachable("Uniform pruning", floor, budget, resource, smallest)
    resource.set_resolution(FLOOR_RESOLUTION * budget.original, budget.target)
    confirm = recalibrate or resource.confirm
    for i in range(opts.bisection_steps):
        t0 = time.perf_counter()
        ratio = (lo + hi) / 2
        model, plan = pruned_candidate(original, None, ratio, opts.importance, opts.round_to, batch)
        cand = Candidate(model, plan, resource.of(model), "*", None, score=ratio)
        latency_ok = budget.resource == "latency_ms" and cand.resource <= budget.target
        measured = confirm(model) if latency_ok else None
        if measured is not None:
            cand.resource = measured
        ok = cand.resource <= budget.target
        if ok:
            best, lo = cand, ratio
        else:
            hi = ratio
        result.history.append(IterationRecord(i, budget.target, "*", 0, 0, cand.resource, measured, None,
                                              [{"ratio": ratio, "resource": cand.resource, "meets": ok}],
                                              round(time.perf_counter() - t0, 2)))
        log(f"ratio {ratio:.3f}: {budget.resource} {cand.resource:.4g} ({'meets' if ok else 'over'} {budget.target:.4g})")
    if best is None:
        confirm_floor("Uniform pruning", floor, budget, resource, smallest)
    result.model = floor if best is None else best.model
    result.search_seconds = time.perf_counter() - t_start
    return result

