"""NetAdapt (Yang et al., ECCV 2018): iterative, resource-driven channel pruning.

Iteration i asks for resource R_i = R_{i-1} - r0 * R_0 * decay^i (never below the budget). Each prunable
group proposes the largest width on the rounding grid whose network meets R_i (found by bisection: the
resource is monotone in the width), keeping the channels the importance criterion ranks highest. With
data, each proposal is fine-tuned briefly and evaluated on the held-out split, and the best one is kept
(by accuracy, or by the smallest accuracy drop per unit of resource saved). Without data, the proposal
that keeps the largest fraction of its group's original channels wins: the layer that gives up the
fewest channels for the same saving. After the budget is met (measured, for latency), a long-term
fine-tune follows. With `workers` or `ray_address` the proposals' fine-tunes and evaluations run as Ray tasks
(squeeze.util.workers), once every proposal of the iteration is built and measured; the result is the same.

Measured latency is noisy and, under load, not monotone in the width. So: readings are ratios to the
original timed interleaved, sampled until their interval is narrower than the iteration's step; before
the search, the smallest allowed model (every group at its minimum width) is measured once and a budget
below it is refused; when no proposal reads under an iteration's target, every group steps one grid width
down and the best of those is taken, so a high reading slows the search but never ends it. A budget is
called unreachable only when every group is at its minimum width and that model measures above it.

Resumable: after every iteration the current plan, fine-tuned weights and history are saved (with the RNG
states, squeeze.prune.resume), and `--resume` goes on from the next iteration, to the plan the run would
have reached without stopping.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field

from squeeze.methods.base import register_pass
from squeeze.methods.prune import PruneOptions, PruneSearch
from squeeze.progress import task as progress_task
from squeeze.train.config import FineTuneConfig, ProxyConfig

if TYPE_CHECKING:
    from squeeze.data import DataBundle
    from squeeze.model.loading import LoadedModel
    from squeeze.prune.budget import Resource, ResolvedBudget
    from squeeze.prune.resume import SearchProgress
    from squeeze.prune.search import Candidate, IterationRecord, SearchResult
    from squeeze.util.workers import Workers

__all__ = ["NetAdaptOptions", "NetAdaptPass", "netadapt"]


class NetAdaptOptions(PruneOptions):
    initial_reduction: float = Field(0.025, gt=0, lt=1, description="r0: first step, as a fraction of the original")
    decay: float = Field(0.96, gt=0, le=1)
    max_iterations: int = Field(100, ge=1)
    select: Literal["accuracy", "accuracy_per_latency"] = "accuracy"
    short_term: FineTuneConfig = FineTuneConfig(optimizer="sgd", lr=0.001, iterations=100)
    proxy: ProxyConfig = Field(ProxyConfig(), description="cheaper proposal evaluation (EcoNAS); check that it "
                               "keeps the ranking with `squeeze proxy check`")
    workers: int | None = Field(None, ge=1, description="fine-tune and evaluate the proposals as Ray tasks on a "
                                "local Ray of this many CPUs (pip install 'squeeze[ray]')")
    ray_address: str | None = Field(None, pattern=r"^[^:\s]+:\d+$", description="HOST:PORT of a running Ray "
                                    "cluster to evaluate the proposals on, instead of workers")
    proposal_threads: int | None = Field(None, ge=1, description="torch threads of each proposal's fine-tune "
                                         "(default: all of this process's when serial, 1 per Ray task); the same "
                                         "count gives the same result wherever it runs")


@register_pass
class NetAdaptPass(PruneSearch):
    name = "prune.netadapt"
    summary = "NetAdapt: iterative per-layer channel pruning driven by measured/table latency, short fine-tunes."
    Options = NetAdaptOptions
    resumable = True
    smoke_options = {"initial_reduction": 0.1, "short_term": {"iterations": 2},
                     "long_term": {"iterations": 2}}

    def search(self, original, budget, resource, data, recalibrate, log, progress=None) -> SearchResult:
        return netadapt(original, budget, resource, self.options, data, recalibrate, log, progress)


# The search. The pruning engine (torch) loads when it runs, not when `squeeze list` imports this module.

class _Proposals:
    """One NetAdapt iteration's proposals from the current model."""

    def __init__(self, current: Candidate, original_widths: dict[str, int], resource: Resource,
                 opts: NetAdaptOptions, data: DataBundle | None, evaluator: Any, workers: Workers,
                 threads: int) -> None:
        """`evaluator`: the search's CandidateEvaluator as `workers` shared it; `threads` per fine-tune."""
        self.current, self.original_widths, self.resource, self.opts, self.data = (
            current, original_widths, resource, opts, data)
        self.evaluator, self.workers, self.threads = evaluator, workers, threads
        from squeeze.prune.search import taylor_batch

        self.batch = taylor_batch(data, opts.importance)
        self.built: dict[tuple[str, int], Candidate] = {}
        self.price = resource.width_predictor(current.model) or self._build_and_price

    def candidate(self, layer: str, width: int) -> Candidate:
        from squeeze.prune.search import Candidate, pruned_candidate

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
        from squeeze.prune.search import width_grid

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
        from squeeze.prune.search import width_grid

        steps = [(layer.name, width_grid(layer, self.opts.round_to)[-1]) for layer in layers]
        return {name: (width, value) for (name, width), value in zip(steps, self.price(steps))}

    def evaluate(self, cands: list[Candidate], promoted: bool = False) -> None:
        """Short fine-tune and held-out top-1 of each (cut by the proxy; a promoted proposal finishes both in
        full), all at once on the workers; each candidate goes on from its fine-tuned weights."""
        from squeeze.prune.proxy import fine_tuned

        tasks = [(c.model.module, promoted, self.threads) for c in cands]
        with progress_task(f"{'promoted' if promoted else 'proposals'} of this iteration", total=len(cands),
                           unit="fine-tuned") as bar:
            results = self.workers.map(fine_tuned, self.evaluator, tasks, cpus=self.threads,
                                       on_done=lambda: bar.advance(1))
        for cand, (weights, accuracy) in zip(cands, results):
            cand.model.module.load_state_dict(weights)
            cand.accuracy = accuracy
            if self.opts.select == "accuracy":
                cand.score = accuracy
            else:  # smallest accuracy drop per unit of resource saved
                saved = max(self.current.resource - cand.resource, 1e-12)
                cand.score = -(self.current.accuracy - accuracy) / saved

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
        # Every proposal is built, and so measured, before any is fine-tuned: a latency reading on the host must
        # not share it with fine-tunes running in parallel.
        props = [self.candidate(name, w) for name, (w, _) in widths.items()]
        self.evaluate(props)
        promoted = set()
        if self.opts.proxy.promote and not self.opts.proxy.is_full:  # EcoNAS: the proxy's best few in full
            top = sorted(props, key=lambda c: (c.score, -c.resource), reverse=True)[:self.opts.proxy.promote]
            self.evaluate(top, promoted=True)
            promoted = {id(c) for c in top}
        best = max(props, key=lambda c: (id(c) in promoted, c.score, -c.resource))
        return best, [{"layer": p.layer, "width": p.width, "resource": p.resource, "accuracy": p.accuracy,
                       "score": p.score} for p in props]


def _record(i: int, target: float, best: Candidate, proposals: list[dict[str, Any]], measured,
            layer_widths: dict[str, int], t0: float) -> IterationRecord:
    from squeeze.prune.search import IterationRecord

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
             log: Callable[[str], None] = lambda _msg: None, progress: SearchProgress | None = None) -> SearchResult:
    """Prune `original` until `budget` is met; `recalibrate(model)` (table oracles) re-fits the table; `progress`
    saves the search after every iteration and, resuming, gives back where a stopped run was."""
    from squeeze.prune.budget import BudgetError, check_reachable, confirm_floor
    from squeeze.prune.graph import prunable_layers
    from squeeze.prune.search import SMALLEST, Candidate, SearchResult, shrinkable, smallest_model
    from squeeze.prune.proxy import task_threads
    from squeeze.util.workers import Workers

    workers = Workers(opts.workers, opts.ray_address) if data is not None else Workers()
    threads = task_threads(workers, opts.proposal_threads)
    t_start = time.perf_counter()
    x = original.example_input()
    original_widths = prunable_layers(original.module, x).widths()
    check_reachable("NetAdapt", smallest_model(original, opts.round_to), budget, resource, SMALLEST)
    current = Candidate(original, None, budget.original)
    evaluator = None
    if data is not None:
        from squeeze.prune.proxy import CandidateEvaluator

        evaluator = CandidateEvaluator(data.train, data.val, opts.short_term, opts.proxy, seed=0)
        evaluator.check_model(original.module, original.input_shape)
        current.accuracy = evaluator.accuracy(original.module)
    result = SearchResult(original, budget)
    confirm = recalibrate or resource.confirm
    i = 0
    saved = progress.restore() if progress else None
    if saved is not None:
        current, i, seconds = _resumed(original, saved, result)
        t_start -= seconds
        log(f"resumed after iteration {i - 1}: {budget.resource} {current.resource:.4g}")
    # The bar counts the share of the reduction done: iterations are as many as the steps the budget takes.
    span = max(budget.original - budget.target, 1e-12)

    def _reduced(c) -> float:
        return min(100.0, 100.0 * (budget.original - c.resource) / span)

    with workers, progress_task(f"NetAdapt to {budget.target:.4g} {budget.resource}", total=100,
                                unit="% of the way") as bar:
        shared = workers.share(evaluator)  # the data sets go to the workers once, not with every task
        if data is not None:
            result.extra["evaluation"] = {**workers.describe(), "proposal_threads": threads}
        bar_at = _reduced(current)
        bar.advance(bar_at)
        while current.resource > budget.target:
            if i == opts.max_iterations:
                raise BudgetError(f"NetAdapt stopped after {opts.max_iterations} iterations at {current.resource:.4g} "
                                  f"{budget.resource} (budget {budget.target:.4g}).",
                                  "Raise max_iterations or initial_reduction.")
            t0 = time.perf_counter()
            table = prunable_layers(current.model.module, x)
            layers = shrinkable(table, opts.round_to)
            if not layers:  # every group at its minimum width: the floor itself decides
                current.resource = confirm_floor("NetAdapt", current.model, budget, resource, SMALLEST)
                break
            step = opts.initial_reduction * budget.original * opts.decay ** i
            proposals = _Proposals(current, original_widths, resource, opts, data, shared, workers, threads)
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
            current, i = best, i + 1
            bar.advance(_reduced(current) - bar_at, iteration=i, best=f"{best.layer} -> {best.width}",
                        **{budget.resource: f"{best.resource:.4g}"}, **({"val": f"{best.accuracy:.4f}"} if data else {}))
            bar_at = _reduced(current)
            if progress is not None:
                progress.save({"iteration": i, "resource": current.resource, "accuracy": current.accuracy,
                               "plan": current.plan.to_json(), "history": [asdict(h) for h in result.history],
                               "search_seconds": time.perf_counter() - t_start}, current.model.module.state_dict())
    result.model = current.model
    result.search_seconds = time.perf_counter() - t_start
    return result


def _resumed(original: LoadedModel, saved, result: SearchResult) -> tuple[Candidate, int, float]:
    """The current candidate, the next iteration and the seconds searched so far of a stopped search (its
    history goes back into `result`)."""
    from squeeze.prune.plan import plan_from_json
    from squeeze.prune.search import Candidate, IterationRecord, replayed_model

    state, weights = saved
    plan = plan_from_json(state["plan"])
    result.history = [IterationRecord(**h) for h in state["history"]]
    current = Candidate(replayed_model(original, plan, weights), plan, state["resource"], accuracy=state["accuracy"])
    return current, state["iteration"], state["search_seconds"]
