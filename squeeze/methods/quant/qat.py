"""`quant.qat`: quantization-aware training, exported to the same ONNX QDQ graph as `quant.int8`.

The precision plan (activation/weight types, layers left float) is decided as for `quant.int8`, by measuring
on the target (`plan_int8`); the model is then fine-tuned with fake quantization under that plan (distilling
from the fp32 model by default) and exported with its trained weights and activation ranges
(squeeze.quant.qat: the fake-quant model matched to the QDQ graph, and its export). The report gives the
parity of the torch fake-quant model with the ONNX Runtime int8 model.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from squeeze.methods.base import ModelState, Pass, PassContext, register_pass
from squeeze.methods.quant.int8 import Int8Options
from squeeze.train.config import FineTuneConfig

__all__ = ["QatOptions", "QatPass", "run_qat"]


class QatOptions(Int8Options):
    fine_tune: FineTuneConfig = FineTuneConfig(optimizer="sgd", lr=0.001, epochs=2)
    distill: bool = Field(True, description="distil from the fp32 model while fine-tuning")
    activation_ranges: Literal["learned", "calibrated"] = Field(
        "learned", description="learned: activation scales are trained (LSQ-style); calibrated: kept from "
        "calibration")


@register_pass
class QatPass(Pass):
    name = "quant.qat"
    summary = "Quantization-aware fine-tuning (fake-quant, STE) exported to the same int8 QDQ graph as quant.int8."
    Options = QatOptions
    runtimes = ("onnxruntime",)
    smoke_options = {"fine_tune": {"iterations": 2}}

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        return run_qat(state, ctx, self.options)


def run_qat(state: ModelState, ctx: PassContext, opts) -> tuple[ModelState, dict[str, Any]]:
    import torch

    from squeeze.export.ort import run_batched
    from squeeze.methods.quant.int8 import plan_int8
    from squeeze.quant.ptq import QuantizeError, compare_outputs
    from squeeze.quant.qat import build_qat_model, export_qat
    from squeeze.quant.run import (
        check_budget,
        check_result_budget,
        check_target,
        describe,
        eval_inputs,
        final_parity,
        run_summary,
    )
    from squeeze.model.summary import summarize
    from squeeze.train import evaluate, evaluate_onnx, fine_tune

    check_target("qat", ctx.target)
    check_budget(ctx.budget, summarize(state.model).params, 1, "int8")
    if state.model.module is None:
        raise QuantizeError("QAT fine-tunes a torch model; this model was given as ONNX.",
                            "Pass the torch model (checkpoint, zoo: or package.module:factory), or use --method int8.")
    plan = plan_int8(state, ctx, opts)
    fp32_ms = plan.record["type_choice"]["fp32_median_ms"]
    if plan.config is None:  # auto-exclusion fell back to fp32: nothing to fine-tune
        state.artifact = plan.fp32
        return state, {"summary": run_summary("qat", None, None), "method": "qat",
                       "fallback": "fp32: no int8 model was faster on the target", **plan.record,
                       **describe(plan.fp32, plan.fp32),
                       "budget": check_result_budget(ctx.budget, None, fp32_ms, plan.fp32, "qat")}
    data = ctx.data
    qat = build_qat_model(state.model.module, plan.fp32, plan.artifact, plan.config,
                          plan.calibration.inputs[:16], opts.activation_ranges == "learned")
    split, x = eval_inputs(data)
    eval_ds = data.held_out()[1]
    before = evaluate(qat.module, eval_ds)
    teacher = state.model.module if opts.distill else None
    result = fine_tune(qat.module, data.train, opts.fine_tune, teacher=teacher, val_ds=data.val)
    artifact = export_qat(qat, plan.fp32, plan.calibration, plan.config)
    with torch.no_grad():
        torch_out = qat.module(torch.from_numpy(x)).numpy()
    record = {
        "summary": run_summary("qat", plan.config, plan.speedup),
        "method": "qat",
        "config": plan.config.model_dump(),
        "fallback": None,
        **plan.record,
        "speedup_vs_fp32": plan.speedup.to_json(),
        "budget": check_result_budget(ctx.budget, plan.speedup, fp32_ms, artifact, "qat"),
        **describe(artifact, plan.fp32),
        "output_parity": final_parity("The QAT model", plan.parity, artifact, opts),
        "qat": {
            "activation_ranges": opts.activation_ranges,
            "fake_quant_activations": len(qat.owners),
            "fine_tune": result.to_json(),
            "torch_top1_before": before.top1,
            "torch_top1_after": evaluate(qat.module, eval_ds).top1,
            "ptq_top1": evaluate_onnx(plan.artifact, eval_ds).top1,
            "torch_vs_onnx": {"split": split, **compare_outputs(torch_out, run_batched(artifact, x)).to_json()},
        },
    }
    state.artifact = artifact
    return state, record
