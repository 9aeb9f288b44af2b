"""Budgets for searches: what resource is limited (latency, MACs, size) and to what value.

A search sees latency only through a LatencyOracle (a lookup table or whole-model measurement); the
final word on a latency budget is always a measurement of the exported model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Literal

from squeeze.errors import SqueezeError
from squeeze.measure.oracle import LatencyOracle
from squeeze.measure.protocol import CONTENDED
from squeeze.model.loading import LoadedModel
from squeeze.recipe import Budget
from squeeze.model.summary import summarize

__all__ = ["BudgetError", "Resource", "ResolvedBudget", "budget_resource", "check_reachable", "confirm_floor",
           "resolve_budget", "unreachable"]

ResourceName = Literal["latency_ms", "macs", "size_bytes"]
_log = logging.getLogger("squeeze.prune")

# The floor is measured to within this fraction of the original: a budget that close to it is tried, not refused.
FLOOR_RESOLUTION = 0.02
# A suggested latency budget sits this far above the floor's reading: a search that must reach the floor
# exactly meets the budget only when the final reading comes out low.
LATENCY_HEADROOM = 1.1


class BudgetError(SqueezeError):
    pass


@dataclass
class Resource:
    """How much of `name` a model uses: predicted for search steps, measured for the final check."""

    name: ResourceName
    oracle: LatencyOracle | None = None  # for latency: the search's oracle (table or measured)
    measured: LatencyOracle | None = None  # for latency: whole-model measurement (relative to the original)

    def of(self, model: LoadedModel) -> float:
        if self.name == "latency_ms":
            return self.oracle.latency_ms(model)
        s = summarize(model)
        return float(s.macs if self.name == "macs" else s.size_bytes)

    def width_predictor(self, model: LoadedModel) -> Callable[[list[tuple[str, int]]], list[float]] | None:
        """Prices proposals (group name, width) of `model` without pruning it, where the oracle can: a
        lookup table prices layer configurations. None: each proposal must be built and measured."""
        price = self.policy_predictor(model)
        return None if price is None else lambda proposals: price([{n: w} for n, w in proposals])

    def policy_predictor(self, model: LoadedModel) -> Callable[[list[dict[str, int]]], list[float]] | None:
        """As `width_predictor`, for policies that set several groups at once ({group name: width})."""
        predict = getattr(self.oracle, "predict_configs", None)
        if self.name != "latency_ms" or predict is None:
            return None
        from squeeze.prune.effects import WidthEffects

        effects = WidthEffects(model.module, model.example_input())
        return lambda policies: [p.total_ms for p in predict([effects.configs_with(w) for w in policies])]

    def confirm(self, model: LoadedModel) -> float:
        """The value a report may claim: measured for latency, counted otherwise."""
        return self.measured.latency_ms(model) if self.name == "latency_ms" else self.of(model)

    def interval(self, model: LoadedModel) -> tuple[float, float, float]:
        """(value, low, high) of the confirmed value: a measurement's interval for latency, exact otherwise."""
        if self.name != "latency_ms":
            value = self.of(model)
            return value, value, value
        r = self.measured.reading(model)
        return r.ms, r.low_ms, r.high_ms

    def set_resolution(self, step: float | None, threshold: float | None = None) -> None:
        """Measurements from now on tell apart values `step` apart, or tell a value from `threshold` (in this
        resource's unit; step None: one batch of samples)."""
        for oracle in (self.oracle, self.measured):
            if oracle is not None:
                oracle.resolution_ms, oracle.threshold_ms = step, threshold


@dataclass(frozen=True)
class ResolvedBudget:
    resource: ResourceName
    original: float
    target: float

    @property
    def ratio(self) -> float:
        return self.target / self.original


def resolve_budget(budget: Budget | None, model: LoadedModel, resource: Resource) -> ResolvedBudget:
    """Turn a budget (ratios of the original or absolute values) into a target for `resource.name`."""
    if budget is None:
        raise BudgetError("A pruning search needs a budget.", "Pass --latency 0.5x, --latency-ms 12, --macs 0.5x or "
                          "--size-bytes N (or `budget:` in the recipe).")
    original = resource.confirm(model)
    if resource.name == "latency_ms":
        target = budget.latency_ms if budget.latency_ms is not None else budget.latency_ratio * original
    elif resource.name == "macs":
        target = budget.macs_ratio * original
    else:
        target = float(budget.size_bytes)
    if target >= original:
        raise BudgetError(f"The budget ({resource.name} <= {target:.4g}) is already met by the original model "
                          f"({original:.4g}).", "Ask for less than the original, e.g. --latency 0.5x.")
    return ResolvedBudget(resource.name, original, target)


def budget_resource(budget: Budget | None) -> ResourceName:
    """Which resource a budget limits (latency first when several are given)."""
    if budget is None or budget.latency_ms is not None or budget.latency_ratio is not None:
        return "latency_ms"
    return "macs" if budget.macs_ratio is not None else "size_bytes"


def _nearest_flag(budget: ResolvedBudget, floor_high: float) -> str:
    """The flag value closest to the floor that a search can meet, in the units a user writes."""
    if budget.resource == "size_bytes":
        return f"--size-bytes {math.ceil(floor_high)}"
    if budget.resource == "macs":
        return f"--macs {math.ceil(100 * floor_high / budget.original) / 100:.2f}x"
    ratio = math.ceil(100 * LATENCY_HEADROOM * floor_high / budget.original) / 100
    return f"--latency {ratio:.2f}x (--latency-ms {ratio * budget.original:.3g})"


def unreachable(search: str, budget: ResolvedBudget, floor: tuple[float, float, float], smallest: str,
                contention: float = 1.0) -> BudgetError:
    """The error for a budget below the smallest model `search` may produce; `floor`: its (value, low, high);
    `contention`: the measuring run's (oracle.RelativeOracle.contention)."""
    value, _, high = floor
    how = "measures" if budget.resource == "latency_ms" else "counts"
    busy = (f" It was measured on a contended machine (the original ran {contention:.2f}x slower than at its "
            "quietest), where small models read slower still." if contention > CONTENDED else "")
    return BudgetError(
        f"{search} cannot meet {budget.resource} <= {budget.target:.4g} ({budget.ratio:.3g}x of the original): "
        f"the smallest allowed model ({smallest}) {how} {value / budget.original:.3g}x of the original "
        f"({value:.4g} {budget.resource}).{busy}",
        f"Use {_nearest_flag(budget, high)} or more, or a smaller --round-to.",
    )


def _contention(resource: Resource) -> float:
    """The last measured ratio's contention (1: no measurement, or a quiet run)."""
    contention = getattr(resource.measured, "contention", None) if resource.name == "latency_ms" else None
    return contention if isinstance(contention, float) else 1.0


def check_reachable(search: str, floor: LoadedModel, budget: ResolvedBudget, resource: Resource,
                    smallest: str) -> None:
    """Before a search: measure (or count) the smallest model it may produce and refuse a budget below it.

    Refused only when the whole interval lies above the budget: a budget near the floor is tried. Samples
    stop as soon as the interval is clear of the budget (at once for most budgets), else at FLOOR_RESOLUTION.
    """
    resource.set_resolution(FLOOR_RESOLUTION * budget.original, budget.target)
    interval = resource.interval(floor)
    if interval[1] <= budget.target:
        return
    contention = _contention(resource)
    # A contended machine slows a small model more than the original (seen here: one pruned fashion-cnn read 0.49x
    # and 0.41x in two runs), so a floor within that slowdown of the budget may be met on a quiet run: searched.
    if contention > CONTENDED and interval[1] / contention <= budget.target:  # (value, low, high)
        _log.warning(f"the smallest allowed model ({smallest}) reads {interval[0] / budget.original:.3g}x of the "
                     f"original, over the {budget.ratio:.3g}x budget, on a contended machine (the original ran "
                     f"{contention:.2f}x slower than at its quietest): searched all the same, since small models "
                     "read slower still on such a machine; the final measurement decides.")
        return
    raise unreachable(search, budget, interval, smallest, contention)


def confirm_floor(search: str, floor: LoadedModel, budget: ResolvedBudget, resource: Resource, smallest: str) -> float:
    """After a search found nothing smaller: the smallest allowed model, measured again, meets the budget (its
    value is returned) or the budget is unreachable. The only place a search calls a budget unreachable."""
    interval = resource.interval(floor)
    if interval[0] > budget.target:
        raise unreachable(search, budget, interval, smallest, _contention(resource))
    return interval[0]
