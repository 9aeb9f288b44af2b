"""The first passes: export to ONNX (with parity) and measure latency on the target."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from squeeze.methods.base import ModelState, Pass, PassContext, PassOptions, register_pass

__all__ = ["ExportOnnx", "MeasureLatency"]


def ensure_artifact(state: ModelState, ctx: PassContext) -> ModelState:
    if state.artifact is None:
        from squeeze.export.onnx import export_onnx

        state.artifact = export_onnx(state.model, exporter=ctx.export.exporter, atol=ctx.export.atol,
                                     rtol=ctx.export.rtol, use_cache=ctx.use_cache)
    return state


@register_pass
class ExportOnnx(Pass):
    name = "export.onnx"
    summary = "Export to ONNX (dynamic batch) and check parity with the torch model."

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        state.artifact = None  # re-export: an earlier pass may have changed the model
        state = ensure_artifact(state, ctx)
        return state, state.artifact.to_json()


class MeasureOptions(PassOptions):
    label: str = Field("latency", description="name of this measurement in the report")


@register_pass
class MeasureLatency(Pass):
    name = "measure.latency"
    summary = "Measure the exported model's latency on the target with the recipe's protocol."
    Options = MeasureOptions

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        from squeeze.measure.bench import measure

        state = ensure_artifact(state, ctx)
        (m,) = measure([state.artifact], ctx.target, ctx.protocol, use_cache=ctx.use_cache)
        state.measurements[self.options.label] = m
        return state, {"label": self.options.label, "median_ms": m.stats.median_ms}
