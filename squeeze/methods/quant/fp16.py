"""`quant.fp16`: fp16 weights and compute, for GPU targets (ONNX Runtime's CUDA / TensorRT providers), measured
against fp32 interleaved as int8 is; a CPU target is refused before any work (its fp16 convolutions run as
fp32 between Casts, slower)."""

from __future__ import annotations

from typing import Any

from squeeze.methods.base import ModelState, Pass, PassContext, register_pass
from squeeze.quant.parity import ParityFloor

__all__ = ["Fp16Pass", "run_fp16"]


@register_pass
class Fp16Pass(Pass):
    name = "quant.fp16"
    summary = "fp16 weights and compute for GPU targets (ONNX Runtime CUDA EP); measured against fp32."
    Options = ParityFloor
    devices = ("cuda",)  # a CPU runs fp16 convolutions as fp32 between Casts: refused there
    runtimes = ("onnxruntime",)

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        return run_fp16(state, ctx, self.options)


def run_fp16(state: ModelState, ctx: PassContext, opts) -> tuple[ModelState, dict[str, Any]]:
    from squeeze.methods.builtin import ensure_artifact
    from squeeze.quant.parity import OrtParity
    from squeeze.quant.ptq import op_counts, to_fp16
    from squeeze.quant.run import (
        LatencyGoal,
        NotFasterError,
        check_budget,
        check_result_budget,
        check_target,
        final_parity,
        measure_speedups,
    )
    from squeeze.model.summary import summarize

    check_target("fp16", ctx.target)
    check_budget(ctx.budget, summarize(state.model).params, 2, "fp16")
    state = ensure_artifact(state, ctx)
    fp32 = state.artifact
    fp16 = to_fp16(fp32)
    fp32_m, (speedup,) = measure_speedups(fp32, [fp16], ctx)
    if not LatencyGoal.of(ctx.budget, fp32_m.stats.median_ms).met(speedup):
        raise NotFasterError(
            f"The fp16 model is not faster than fp32 on `{ctx.target.name}`: measured speedup {speedup.ratio:.3f}x "
            f"[{speedup.low:.3f}, {speedup.high:.3f}] (95% interval, interleaved). Nothing was written.",
            "Keep the fp32 model, or try --method int8 on a target with int8 kernels.")
    record = {
        "method": "fp16",
        "speedup_vs_fp32": speedup.to_json(),
        "budget": check_result_budget(ctx.budget, speedup, fp32_m.stats.median_ms, fp16, "fp16"),
        "op_counts": op_counts(fp16.path),
        "size_bytes": {"fp32": fp32.path.stat().st_size, "final": fp16.path.stat().st_size},
        "output_parity": final_parity("The fp16 model", OrtParity(fp32, ctx.data, opts.parity_samples), fp16, opts)
        if ctx.data is not None else None,
    }
    state.artifact = fp16
    return state, record
