"""`reparam.lego`: trained convs replaced by Lego convolutions (m lego filters shared by o input fragments,
each output a scaled choice of one per fragment), fitted to the trained layer by alternating least squares,
fine-tuned with the selection learned straight-through, kept only where the target runs them faster."""

from __future__ import annotations

from pydantic import Field

from squeeze.methods.base import register_pass
from squeeze.methods.reparam import ReparamOptions, ReparamPass

__all__ = ["LegoOptions", "LegoPass"]


class LegoOptions(ReparamOptions):
    splits: int = Field(2, ge=1, description="o: input channel fragments")
    lego_ratio: float = Field(0.5, gt=0, le=1, description="m = lego_ratio x n lego filters per layer")
    fit_iterations: int = Field(10, ge=1, description="alternations of assignment and lego-filter fit")


@register_pass
class LegoPass(ReparamPass):
    name = "reparam.lego"
    summary = "Lego filters for trained convs: fitted by alternating least squares, kept where measured faster."
    Options = LegoOptions

    def spec(self):
        from squeeze.reparam.modules import LegoSpec

        return LegoSpec(self.options.splits, self.options.lego_ratio)

    def fit(self, conv, data):
        from squeeze.reparam.fit import fit_lego

        module, fit = fit_lego(conv, self.spec(), data, iterations=self.options.fit_iterations)
        return module, {"relative_error": fit.check_error, "objective": [round(e, 5) for e in fit.errors]}
