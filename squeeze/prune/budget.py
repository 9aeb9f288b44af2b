"""Budgets for searches: what resource is limited (latency, MACs, size) and to what value.

A search sees latency only through a LatencyOracle (a lookup table or whole-model measurement); the
final word on a latency budget is always a measurement of the exported model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from squeeze.errors import SqueezeError
from squeeze.measure.oracle import LatencyOracle
from squeeze.model import LoadedModel
from squeeze.recipe import Budget
from squeeze.summary import summarize

__all__ = ["BudgetError", "Resource", "ResolvedBudget", "budget_resource", "resolve_budget"]

ResourceName = Literal["latency_ms", "macs", "size_bytes"]


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
        predict = getattr(self.oracle, "predict_configs", None)
        if self.name != "latency_ms" or predict is None:
            return None
        from squeeze.prune.effects import WidthEffects

        effects = WidthEffects(model.module, model.example_input())
        return lambda proposals: [p.total_ms for p in predict([effects.configs_at(n, w) for n, w in proposals])]

    def confirm(self, model: LoadedModel) -> float:
        """The value a report may claim: measured for latency, counted otherwise."""
        return self.measured.latency_ms(model) if self.name == "latency_ms" else self.of(model)


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
