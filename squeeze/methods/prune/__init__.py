"""Channel-pruning searches, one module each; what they share: their common options and the pass that runs a
search under the recipe's budget (squeeze.prune.search.run_pruning_search)."""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from squeeze.methods.base import ModelState, Pass, PassContext, PassOptions
from squeeze.train.config import FineTuneConfig

if TYPE_CHECKING:
    from squeeze.prune.search import SearchResult

__all__ = ["PruneOptions", "PruneSearch"]


class PruneOptions(PassOptions):
    """Options every channel-pruning search takes."""

    importance: str = Field("l1", description="a registered criterion: l1, l2, bn_scale, taylor or a plugin's "
                                              "(squeeze list importances)")
    round_to: int = Field(8, ge=1, description="widths are multiples of this (hardware-friendly)")
    latency_source: Literal["auto", "table", "measured", "table+recalibrate"] = Field(
        "auto", description="how the search predicts latency (auto: measured below 1 ms, else table+recalibrate); "
        "the budget is always confirmed by measurement")
    recalibrate_every: int = Field(4, ge=1, description="table+recalibrate: measure the current model every N steps")
    long_term: FineTuneConfig = FineTuneConfig(optimizer="sgd", lr=0.01, epochs=10)
    distill: bool = Field(False, description="long-term fine-tune distils from the unpruned model")


class PruneSearch(Pass):
    """A pruning search as a pass: subclasses give `search`, the harness does the rest."""

    needs_budget = True

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        from squeeze.prune.search import run_pruning_search

        return run_pruning_search(state, ctx, self.options, self.name.removeprefix("prune."), self.search)

    @abstractmethod
    def search(self, original, budget, resource, data, recalibrate, log) -> SearchResult:
        """Prune `original` (a LoadedModel) until `budget` is met on `resource`; `recalibrate(model)` re-fits a
        lookup table to a measurement (None when latency is not from a table); `log` takes progress lines."""
