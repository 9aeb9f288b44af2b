"""Quantization passes: `quant.int8` (static int8 QDQ), `quant.fp16` (GPU targets), `quant.qat`.

Options are typed; torch and onnxruntime load in run(). The orchestration is squeeze.quant.run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from squeeze.methods.base import (
    ModelState,
    Pass,
    PassContext,
    register_pass,
)
from squeeze.quant.parity import ParityFloor
from squeeze.train.config import FineTuneConfig

__all__ = ["Int8Options", "QatOptions", "Int8Pass", "Fp16Pass", "QatPass"]


class Int8Options(ParityFloor):
    calibration: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are chosen from the calibration samples")
    samples: int = Field(256, ge=1, description="calibration samples from the data's train split")
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)")
    activation_type: Literal["auto", "uint8", "int8"] = Field(
        "auto", description="auto: the fastest on the target, measured")
    weight_type: Literal["auto", "int8", "uint8"] = Field("auto", description="auto: the fastest, measured")
    reduce_range: Literal["auto", "on", "off"] = Field(
        "auto", description="7-bit weights; auto: also tried where the CPU has no int8 dot product (VNNI), whose "
        "8-bit kernels can saturate")
    exclude: list[str] = Field(default_factory=list, description="torch layer names left in float")
    auto_exclude: bool = Field(False, description="when int8 is not faster, return the layers the per-layer "
                               "profile blames to float until it is (else fall back to fp32)")
    max_exclude_steps: int = Field(4, ge=1, description="auto-exclusion rounds before falling back to fp32")
    profile_runs: int = Field(30, ge=3, description="profiled runs per model for the per-layer times")


class QatOptions(Int8Options):
    fine_tune: FineTuneConfig = FineTuneConfig(optimizer="sgd", lr=0.001, epochs=2)
    distill: bool = Field(True, description="distil from the fp32 model while fine-tuning")
    activation_ranges: Literal["learned", "calibrated"] = Field(
        "learned", description="learned: activation scales are trained (LSQ-style); calibrated: kept from "
        "calibration")


@register_pass
class Int8Pass(Pass):
    name = "quant.int8"
    summary = "Static int8 QDQ (ONNX Runtime), types chosen by measuring on the target; never slower than fp32."
    Options = Int8Options

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        from squeeze.quant.run import run_int8

        return run_int8(state, ctx, self.options)


@register_pass
class Fp16Pass(Pass):
    name = "quant.fp16"
    summary = "fp16 weights and compute for GPU targets (ONNX Runtime CUDA EP); measured against fp32."
    Options = ParityFloor

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        from squeeze.quant.run import run_fp16

        return run_fp16(state, ctx, self.options)


@register_pass
class QatPass(Pass):
    name = "quant.qat"
    summary = "Quantization-aware fine-tuning (fake-quant, STE) exported to the same int8 QDQ graph as quant.int8."
    Options = QatOptions

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        from squeeze.quant.qat import run_qat

        return run_qat(state, ctx, self.options)
