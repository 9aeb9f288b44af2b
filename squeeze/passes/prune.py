"""Pruning passes: `prune.netadapt` and the `prune.uniform` baseline. Options are typed; torch loads in run()."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from squeeze.passes.base import ModelState, Pass, PassContext, PassOptions, register_pass
from squeeze.train.config import FineTuneConfig

__all__ = ["NetAdaptOptions", "UniformOptions", "NetAdaptPass", "UniformPass"]


class _PruneOptions(PassOptions):
    importance: str = Field("l1", description="a registered criterion: l1, l2, bn_scale, taylor or a plugin's "
                                              "(squeeze list importances)")
    round_to: int = Field(8, ge=1, description="widths are multiples of this (hardware-friendly)")
    latency_source: Literal["auto", "table", "measured", "table+recalibrate"] = Field(
        "auto", description="how the search predicts latency (auto: measured below 1 ms, else table+recalibrate); "
        "the budget is always confirmed by measurement")
    recalibrate_every: int = Field(4, ge=1, description="table+recalibrate: measure the current model every N steps")
    long_term: FineTuneConfig = FineTuneConfig(optimizer="sgd", lr=0.01, epochs=10)
    distill: bool = Field(False, description="long-term fine-tune distils from the unpruned model")


class NetAdaptOptions(_PruneOptions):
    initial_reduction: float = Field(0.025, gt=0, lt=1, description="r0: first step, as a fraction of the original")
    decay: float = Field(0.96, gt=0, le=1)
    max_iterations: int = Field(100, ge=1)
    select: Literal["accuracy", "accuracy_per_latency"] = "accuracy"
    short_term: FineTuneConfig = FineTuneConfig(optimizer="sgd", lr=0.001, iterations=100)


class UniformOptions(_PruneOptions):
    min_ratio: float = Field(0.05, gt=0, lt=1)
    bisection_steps: int = Field(10, ge=1)


class _SearchPass(Pass):
    """A pruning search (squeeze.prune.run) as a pass; subclasses name the search."""

    search: ClassVar[str]
    needs_budget = True

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        from squeeze.prune.run import run_pruning_search

        return run_pruning_search(state, ctx, self.options, self.search)


@register_pass
class NetAdaptPass(_SearchPass):
    name = "prune.netadapt"
    summary = "NetAdapt: iterative per-layer channel pruning driven by measured/table latency, short fine-tunes."
    Options = NetAdaptOptions
    search = "netadapt"


@register_pass
class UniformPass(_SearchPass):
    name = "prune.uniform"
    summary = "Baseline: the same channel ratio in every layer, bisected to meet the budget."
    Options = UniformOptions
    search = "uniform"
