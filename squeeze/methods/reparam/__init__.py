"""Re-parameterization of trained convolutions, one module each (Ghost, Lego); what they share: their options
and the pass that runs squeeze.reparam.run under the recipe's budget."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from pydantic import Field

from squeeze.methods.base import ModelState, Pass, PassContext, PassOptions
from squeeze.train.config import FineTuneConfig

__all__ = ["ReparamOptions", "ReparamPass"]


class ReparamOptions(PassOptions):
    layers: list[str] | None = Field(None, description="glob patterns of the Conv2d layers to consider (default: "
                                                       "every Conv2d with groups=1 but the stem)")
    force: bool = Field(False, description="replace every candidate, faster on the target or not")
    in_model: bool = Field(True, description="time each candidate inside the whole model too (the model with only "
                                             "that layer replaced, interleaved with the original), and decide on it")
    min_speedup: float = Field(1.05, gt=0, description="without in_model: a replacement is taken when its layer "
                                                       "alone is measured at least this much faster on the target")
    fit_images: int = Field(128, ge=1, description="training images the replacements are fitted on")
    check_images: int = Field(64, ge=1, description="validation images each layer's fit error is reported on")
    # The replaced layers carry their BatchNorm folded in: without it, SGD at 0.01 diverged on the digits and
    # Fashion-MNIST CNNs within 30 steps.
    fine_tune: FineTuneConfig | None = Field(FineTuneConfig(optimizer="sgd", lr=0.001, epochs=1, grad_clip_norm=10.0),
                                             description="after the fit (null: the fitted model as it is)")
    distill: bool = Field(True, description="the fine-tune distils from the original model")


class ReparamPass(Pass):
    """A re-parameterization as a pass: subclasses give the spec and the fit, the harness does the rest."""

    smoke_options = {"fit_images": 16, "check_images": 8, "force": True, "fine_tune": {"iterations": 2}}

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        from squeeze.reparam.run import run_reparam

        return run_reparam(state, ctx, self.options, self.spec(), self.fit)

    @abstractmethod
    def spec(self):
        """The replacement's spec (squeeze.reparam.modules)."""

    @abstractmethod
    def fit(self, conv, data) -> tuple[Any, dict[str, Any]]:
        """The replacement of `conv` fitted to its responses (squeeze.reparam.fit.LayerData), and a record
        with its `relative_error` on the held-out images."""
