"""`reparam.ghost`: trained convs replaced by Ghost modules (primary conv to ceil(n/s) channels + cheap depthwise
d x d ops for the rest), initialised from the trained filters, kept only where the target runs them faster."""

from __future__ import annotations

from pydantic import Field, field_validator

from squeeze.methods.base import register_pass
from squeeze.methods.reparam import ReparamOptions, ReparamPass

__all__ = ["GhostOptions", "GhostPass"]


class GhostOptions(ReparamOptions):
    ratio: int = Field(2, ge=2, description="s: the primary conv computes ceil(n/s) of the n channels")
    dw_size: int = Field(3, ge=1, description="d: the cheap depthwise kernel (odd)")

    @field_validator("dw_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"dw_size must be odd (the cheap op keeps the map size), got {value}")
        return value


@register_pass
class GhostPass(ReparamPass):
    name = "reparam.ghost"
    summary = "Ghost modules for trained convs: fitted to the trained filters, kept where measured faster."
    Options = GhostOptions

    def spec(self):
        from squeeze.reparam.modules import GhostSpec

        return GhostSpec(self.options.ratio, self.options.dw_size)

    def fit(self, conv, data):
        from squeeze.reparam.fit import fit_ghost

        module, error = fit_ghost(conv, self.spec(), data)
        return module, {"relative_error": error}
