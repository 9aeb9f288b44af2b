"""What the quantization methods (squeeze.methods.quant: int8, fp16, qat) share: decide by measuring, never
hand back a slower model, report.

- `check_target`, `check_budget`, `require_data`: refusals before any work (no kernels for the precision on
  the target, a budget quantization can never meet, no calibration data);
- `measure_speedups`: candidates timed interleaved with the fp32 model in one run through the measuring
  oracle; `LatencyGoal` / `is_faster`: faster with confidence (the lower end of the speedup's 95% interval
  above 1) and within a latency budget;
- `final_parity`, `check_result_budget`: the model handed back passes the accuracy floor and the budget on
  measured figures, else nothing is written; `run_summary`, `describe`: what the report says of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from squeeze.errors import DataError, SqueezeError, TargetError
from squeeze.export.artifact import OnnxArtifact
from squeeze.measure.stats import RatioEstimate
from squeeze.methods.base import PassContext
from squeeze.quant.parity import ParityFloor, ParitySource, refuse_below_floor
from squeeze.quant.ptq import QuantConfig, layer_precisions, op_counts
from squeeze.recipe import Budget
from squeeze.target import Target

__all__ = ["QuantTargetError", "MissingCalibrationDataError", "NotFasterError", "QuantBudgetError", "check_target",
           "require_data", "check_budget", "LatencyGoal", "is_faster", "measure_speedups", "eval_inputs",
           "final_parity", "check_result_budget", "run_summary", "describe"]

PARITY_SAMPLES = 512


class QuantTargetError(TargetError):
    """The target's runtime has no kernels for the asked precision."""


class MissingCalibrationDataError(DataError):
    pass


class NotFasterError(SqueezeError):
    """The quantized model is not faster than fp32: nothing is handed back."""

    exit_code = 1


class QuantBudgetError(SqueezeError):
    pass


# ---------------------------------------------------------------------------------------------------
# What a target can run.


def _int8_unsupported(target: Target) -> str | None:
    if target.runtime != "onnxruntime":
        return (f"squeeze runs ONNX QDQ int8 models through ONNX Runtime only; target `{target.name}` uses the "
                f"`{target.runtime}` runtime.")
    first = target.providers[0] if target.providers else "CPUExecutionProvider"
    if first in ("CPUExecutionProvider", "TensorrtExecutionProvider"):
        return None
    if first == "CUDAExecutionProvider":
        return (f"Target `{target.name}` runs ONNX Runtime's CUDA execution provider, which has no int8 convolution "
                "kernels: a QDQ model runs there as float convolutions plus extra QuantizeLinear/DequantizeLinear "
                "work, slower than fp32. int8 on NVIDIA GPUs needs TensorRT.")
    return f"squeeze has not verified int8 QDQ kernels on ONNX Runtime's {first} (target `{target.name}`)."


def _fp16_unsupported(target: Target) -> str | None:
    if target.runtime == "onnxruntime" and target.providers and target.providers[0] in (
            "CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return None
    if target.runtime != "onnxruntime":
        return (f"squeeze runs fp16 models through ONNX Runtime's GPU providers only; target `{target.name}` uses the "
                f"`{target.runtime}` runtime.")
    return (f"Target `{target.name}` runs on {', '.join(target.providers)}: ONNX Runtime's CPU "
            "execution provider has no fp16 convolution kernels on x86; it casts an fp16 model back to float32 "
            "around every convolution (and loses its Conv+ReLU fusions), so the model gets slower, not faster. "
            "fp16 pays off on GPUs.")


def check_target(method: str, target: Target) -> None:
    """Fail before any work when the target cannot run `method`'s precision fast."""
    if method == "fp16":
        reason = _fp16_unsupported(target)
        fix = "Use a GPU target (--target cuda, ONNX Runtime CUDA EP), or --method int8 on this CPU."
    else:
        reason = _int8_unsupported(target)
        fix = ("Use --target host-cpu, a target whose providers start with TensorrtExecutionProvider, or "
               "--method fp16 on a GPU.")
    if reason:
        raise QuantTargetError(reason, fix)


def require_data(ctx: PassContext, method: str):
    if ctx.data is None:
        raise MissingCalibrationDataError(
            f"{method} quantization needs calibration data: static quantization measures each activation's "
            "range on real samples, and accuracy is reported on held-out ones.",
            "Pass --data (digits, a folder of class sub-folders, or package.module:function), or `data:` in "
            "the recipe.")
    return ctx.data


def check_budget(budget: Budget | None, params: int, bytes_per_weight: int, method: str) -> None:
    """Budgets quantization can never meet, refused before any work."""
    if budget is None:
        return
    if budget.macs_ratio is not None:
        raise QuantBudgetError("Quantization does not change the MACs; a --macs budget cannot be met by it.",
                               "Give a latency (--latency 0.6x, --latency-ms N) or size (--size-bytes N) budget, "
                               "or prune (squeeze prune) for MACs.")
    if budget.size_bytes is not None and budget.size_bytes < params * bytes_per_weight:
        raise QuantBudgetError(
            f"The size budget ({budget.size_bytes:,} bytes) is below what {method} weights alone take: "
            f"{params:,} parameters x {bytes_per_weight} byte(s) = {params * bytes_per_weight:,} bytes.",
            "Relax --size-bytes, prune first (squeeze prune --size-bytes), or use --method haq for sub-8-bit "
            "weights.")


@dataclass(frozen=True)
class LatencyGoal:
    """Accept a candidate when it is faster than fp32 with confidence and, with a latency budget, meets it."""

    max_ratio: float | None  # candidate latency / fp32 latency; None without a latency budget

    @classmethod
    def of(cls, budget: Budget | None, fp32_ms: float) -> "LatencyGoal":
        if budget is None:
            return cls(None)
        ratios = [r for r in (budget.latency_ratio, budget.latency_ms / fp32_ms if budget.latency_ms else None)
                  if r is not None]
        return cls(min(ratios) if ratios else None)

    def met(self, speedup: RatioEstimate) -> bool:
        return is_faster(speedup) and (self.max_ratio is None or 1 / speedup.ratio <= self.max_ratio)


def is_faster(speedup: RatioEstimate) -> bool:
    """Faster with confidence: the whole 95% interval of fp32 latency / candidate latency is above 1."""
    return speedup.low > 1.0


# ---------------------------------------------------------------------------------------------------
# Measuring candidates against fp32, and what the result must pass.


def measure_speedups(reference: OnnxArtifact, candidates: list[OnnxArtifact], ctx: PassContext,
                     fresh: bool = False):
    """One interleaved run: (reference measurement, [speedup of each candidate = reference / candidate]).
    `fresh`: a new run even when the cache holds one (a confirmation must be independent). Always a
    measuring oracle, whatever the context's: a quantized model is accepted on measurements, never a table."""
    from squeeze.measure.oracle import MeasuredOracle

    return MeasuredOracle(ctx.target, ctx.protocol, ctx.use_cache).speedups(reference, candidates, fresh)


def eval_inputs(data) -> tuple[str, np.ndarray]:
    split, ds = data.held_out()
    n = min(len(ds), PARITY_SAMPLES)
    return split, np.stack([np.asarray(ds[i][0], dtype=np.float32) for i in range(n)])


def final_parity(what: str, parity: ParitySource, artifact: OnnxArtifact, floor: ParityFloor,
                 **fix) -> dict[str, Any]:
    """The parity of the model about to be handed back; ParityError (nothing written) below the floor."""
    check = parity(artifact)
    refuse_below_floor(f"{what} falls below the accuracy floor against fp32", [(what, check)], floor, **fix)
    return check.to_json(floor)


def check_result_budget(budget: Budget | None, speedup: RatioEstimate | None, fp32_ms: float,
                        artifact: OnnxArtifact, method: str) -> dict[str, Any] | None:
    """The measured result against the budget; QuantBudgetError when missed (nothing is written)."""
    if budget is None:
        return None
    ratio = 1 / speedup.ratio if speedup else 1.0
    size = artifact.path.stat().st_size
    goal = LatencyGoal.of(budget, fp32_ms)
    missed = []
    if goal.max_ratio is not None and ratio > goal.max_ratio:
        missed.append(f"latency {ratio:.3f}x of fp32 (measured) > budget {goal.max_ratio:.3f}x")
    if budget.size_bytes is not None and size > budget.size_bytes:
        missed.append(f"size {size:,} bytes > budget {budget.size_bytes:,}")
    if missed:
        raise QuantBudgetError(
            f"{method} quantization cannot meet the budget on this model: {'; '.join(missed)}.",
            "Relax the budget, prune first (squeeze prune) and quantize the pruned model, or use --method haq.")
    return {"latency_ratio": ratio, "max_latency_ratio": goal.max_ratio, "size_bytes": size,
            "max_size_bytes": budget.size_bytes, "met": True}


def run_summary(method: str, config: QuantConfig | None, speedup: RatioEstimate | None) -> str:
    """One line for the stage table of the recipe view."""
    if config is None:
        return f"{method}: fell back to fp32 (no faster quantized model)"
    floats = f", {len(config.float_layers())} layer(s) float" if config.float_layers() else ""
    return f"{method} {config.label()}{floats}: {speedup.ratio:.3f}x vs fp32"


def describe(artifact: OnnxArtifact, fp32: OnnxArtifact) -> dict[str, Any]:
    return {"layers": layer_precisions(artifact.path), "op_counts": op_counts(artifact.path),
            "size_bytes": {"fp32": fp32.path.stat().st_size, "final": artifact.path.stat().st_size}}
