"""A toy squeeze method: `quant.noop` keeps the model as it is (a template for a real pass)."""

from typing import Any

from squeeze.methods import ModelState, Pass, PassContext, register_pass


@register_pass
class NoopQuant(Pass):
    name = "quant.noop"
    summary = "Hand the model back unchanged (example plugin)"

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        return state, {"kind": "noop"}
