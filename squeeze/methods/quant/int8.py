"""`quant.int8`: static int8 QDQ through ONNX Runtime, the types and the layers left float decided by measuring.

  1. calibration samples from the data's train split;
  2. the candidates the options allow (activation/weight types; 7-bit weights where the CPU has no int8
     dot product) are quantized, checked against fp32 on held-out inputs (squeeze.quant.parity: top-1
     agreement, SNR, accuracy) and measured interleaved with the fp32 model in one run on the target;
     among those above the accuracy floor the fastest is chosen; when none is above it, an error names
     each candidate and by how much it fell short, and nothing is written;
  3. the chosen model must be faster than fp32 with confidence (the lower end of the speedup's 95%
     interval above 1), in that run and again in a second, fresh run. If it is not: without
     auto-exclusion, an error says so and nothing is written; with it, ORT's per-layer profiles of the
     quantized and the fp32 model name the layers that got slower, their quantization is removed, and the
     model is re-measured, until it is faster or no layer is left to blame, when the fp32 model is handed
     back (and the report says so);
  4. a budget (latency or size) is checked on the measured result;
  5. the model handed back passes the floor again (after auto-exclusion, and QAT's export too).
QAT (squeeze.methods.quant.qat) reuses 1-3 (`plan_int8`) to fix the precision plan, then fine-tunes under it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from squeeze.methods.base import ModelState, Pass, PassContext, register_pass
from squeeze.quant.parity import ParityFloor

if TYPE_CHECKING:
    from squeeze.export.artifact import OnnxArtifact
    from squeeze.measure.stats import RatioEstimate
    from squeeze.quant.calibrate import CalibrationData
    from squeeze.quant.parity import ParityCheck, ParitySource
    from squeeze.quant.ptq import QuantConfig
    from squeeze.quant.run import LatencyGoal

__all__ = ["Int8Options", "Int8Pass", "TYPE_CANDIDATES", "type_candidates", "rank_fastest", "ExclusionStep",
           "exclusion_search", "Int8Plan", "plan_int8", "run_int8"]

log = logging.getLogger("squeeze.quant")

# (activation, weight) element types ORT's CPU kernels take; which is fast is measured, not assumed.
TYPE_CANDIDATES: tuple[tuple[str, str], ...] = (("uint8", "int8"), ("int8", "int8"), ("uint8", "uint8"))


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


@register_pass
class Int8Pass(Pass):
    name = "quant.int8"
    summary = "Static int8 QDQ (ONNX Runtime), types chosen by measuring on the target; never slower than fp32."
    Options = Int8Options
    runtimes = ("onnxruntime",)  # QDQ models run through ONNX Runtime's int8 kernels only

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        return run_int8(state, ctx, self.options)


# ---------------------------------------------------------------------------------------------------
# The type candidates. Quantization, ONNX Runtime and the measurements load when the pass runs, not when
# `squeeze list` imports this module.


def type_candidates(activation_type: str, weight_type: str, reduce_range: str = "off",
                    dot_product: bool = True) -> list[tuple[str, str, bool]]:
    """The (activation, weight, 7-bit weights) combinations allowed by the options ("auto" allows all).

    7-bit int8 weights are tried with `reduce_range="on"`, and with "auto" where the CPU has no int8 dot
    product (`dot_product`, VNNI), whose u8s8 kernels can saturate 8-bit weights; uint8 weights take
    kernels that cannot saturate, so they are never reduced.
    """
    ranges = {"on": (True,), "off": (False,), "auto": (False,) if dot_product else (False, True)}[reduce_range]
    return [(a, w, rr) for a, w in TYPE_CANDIDATES for rr in (ranges if w == "int8" else (False,))
            if activation_type in ("auto", a) and weight_type in ("auto", w)]


def rank_fastest(measured: list[tuple[QuantConfig, RatioEstimate]]) -> list[tuple[QuantConfig, RatioEstimate]]:
    """Candidates by median speedup over fp32, fastest first (ties: the order listed)."""
    return sorted(measured, key=lambda cs: -cs[1].ratio)


# ---------------------------------------------------------------------------------------------------
# Auto-exclusion: remove quantization from the layers the profile blames, until faster.


@dataclass
class ExclusionStep:
    blamed: dict[str, float]  # layer -> extra microseconds per run when quantized (profile)
    excluded: list[str]  # all float layers after this step
    speedup: RatioEstimate | None  # measured after this step; None when nothing was left to try

    def to_json(self) -> dict[str, Any]:
        return {"blamed_us": self.blamed, "excluded": self.excluded,
                "speedup": self.speedup.to_json() if self.speedup else None}


def exclusion_search(config: QuantConfig, layers: list[str], accept: Callable[[RatioEstimate], bool],
                     measure: Callable[[QuantConfig], RatioEstimate],
                     blame: Callable[[QuantConfig], list[tuple[str, float]]],
                     max_steps: int) -> tuple[QuantConfig | None, list[ExclusionStep]]:
    """Exclude the layers `blame` names (those slower quantized than in fp32), re-`measure`, repeat.

    Returns the first accepted config, or None (fall back to fp32) when no quantized layer is blamed any
    more, every layer is float, or `max_steps` ran out. Pure given its callbacks, so testable on fakes.
    """
    steps: list[ExclusionStep] = []
    current = config
    for _ in range(max_steps):
        floats = current.float_layers()
        blamed = [(layer, us) for layer, us in blame(current) if layer not in floats]
        if not blamed:
            break
        excluded = sorted(set(current.exclude) | {layer for layer, _ in blamed})
        current = current.model_copy(update={"exclude": excluded})
        if set(layers) <= current.float_layers():
            steps.append(ExclusionStep(dict(blamed), excluded, None))
            break
        speedup = measure(current)
        steps.append(ExclusionStep(dict(blamed), excluded, speedup))
        log.info(f"auto-exclude: {', '.join(layer for layer, _ in blamed)} back to float -> "
                 f"{speedup.ratio:.3f}x [{speedup.low:.3f}, {speedup.high:.3f}]")
        if accept(speedup):
            return current, steps
    return None, steps


# ---------------------------------------------------------------------------------------------------
# int8: the plan (types, exclusions) decided by measurement.


@dataclass
class Int8Plan:
    """What `plan_int8` decided: the config (None: fall back to fp32), its artifact and the evidence."""

    fp32: OnnxArtifact
    calibration: CalibrationData
    config: QuantConfig | None
    artifact: OnnxArtifact
    speedup: RatioEstimate | None
    parity: ParitySource
    record: dict[str, Any] = field(default_factory=dict)

    def quantize(self, config: QuantConfig) -> OnnxArtifact:
        """The fp32 model quantized as `config` says, on this plan's calibration samples (cached)."""
        from squeeze.quant.ptq import quantize_onnx

        return quantize_onnx(self.fp32, self.calibration, config)


def _base_config(opts, activation: str, weight: str, reduce_range: bool) -> QuantConfig:
    from squeeze.quant.ptq import QuantConfig

    return QuantConfig(activation_type=activation, weight_type=weight, reduce_range=reduce_range,
                       per_channel=opts.per_channel, calibration=opts.calibration, exclude=sorted(opts.exclude))


def _candidate_json(config: QuantConfig, speedup: RatioEstimate, check: ParityCheck, floor: ParityFloor) -> dict:
    return {"activation_type": config.activation_type, "weight_type": config.weight_type,
            "reduce_range": config.reduce_range, "label": config.label(), "speedup": speedup.to_json(),
            "parity": check.to_json(floor)}


def _cpu_note(record: dict) -> str:
    """Why int8 may be inaccurate on this CPU, for the error when no candidate passes the floor."""
    cpu = record["cpu_int8"]
    if cpu["int8_dot_product"]:
        return ""
    return ("This CPU has no int8 dot-product instructions (VNNI), where ONNX Runtime's uint8 x int8 kernels sum "
            "products pairwise in 16 bits and can saturate.")


def _blame(fp32: OnnxArtifact, quantize: Callable[[QuantConfig], OnnxArtifact], ctx: PassContext, runs: int):
    """config -> layers slower quantized than in fp32 (ORT's profiles of both, interleaved)."""
    import onnx

    from squeeze.measure.profile import layer_identities, profile_layers, slower_layers

    identities = layer_identities(onnx.load(str(fp32.path)))
    providers = ctx.target.providers

    def blame(config: QuantConfig) -> list[tuple[str, float]]:
        ref, cand = profile_layers([fp32, quantize(config)], identities, providers, ctx.protocol, runs)
        return slower_layers(ref, cand, list(identities))

    return blame


def plan_int8(state: ModelState, ctx: PassContext, opts, parity: ParitySource | None = None) -> Int8Plan:
    """Steps 1-3 of the module docstring; raises ParityError when no candidate passes the accuracy floor,
    NotFasterError when none is faster and auto-exclusion is off. `parity` checks a candidate against fp32
    (default: ONNX Runtime on the held-out split)."""
    from squeeze.measure.environment import cpu_features
    from squeeze.methods.builtin import ensure_artifact
    from squeeze.quant.calibrate import calibration_data
    from squeeze.quant.parity import OrtParity, refuse_below_floor
    from squeeze.quant.ptq import layer_nodes, quantize_onnx
    from squeeze.quant.run import LatencyGoal, NotFasterError, QuantBudgetError, is_faster, measure_speedups, require_data

    data = require_data(ctx, "int8")
    state = ensure_artifact(state, ctx)
    fp32 = state.artifact
    calibration = calibration_data(data, opts.samples, seed=ctx.seed)
    parity = parity or OrtParity(fp32, data, opts.parity_samples)
    layers = list(layer_nodes(fp32))

    def quantize(config: QuantConfig) -> OnnxArtifact:
        return quantize_onnx(fp32, calibration, config)

    cpu = cpu_features()
    combos = type_candidates(opts.activation_type, opts.weight_type, opts.reduce_range, cpu["int8_dot_product"])
    configs = [_base_config(opts, a, w, rr) for a, w, rr in combos]
    artifacts = [quantize(c) for c in configs]
    checks = [parity(a) for a in artifacts]
    fp32_m, speedups = measure_speedups(fp32, artifacts, ctx)
    record: dict[str, Any] = {"calibration": calibration.to_json(), "cpu_int8": cpu,
                              "parity_floor": opts.floor_json()}
    choice = {
        "measured_on": ctx.target.name,
        "fp32_median_ms": fp32_m.stats.median_ms,
        "candidates": [_candidate_json(c, s, p, opts) for c, s, p in zip(configs, speedups, checks)],
        "chosen": None,
        "by_measurement": len(configs) > 1,
    }
    record["type_choice"] = choice
    log.info("types: " + "; ".join(f"{c.label()} {s.ratio:.3f}x, agreement {100 * p.top1_agreement:.1f}%"
                                   for c, s, p in zip(configs, speedups, checks)))
    refuse_below_floor(
        f"No int8 model (of {len(configs)} candidates) keeps the fp32 model's accuracy within the floor",
        [(c.label(), p) for c, p in zip(configs, checks)], opts, _cpu_note(record))
    # Speed decides only among the candidates that keep the accuracy.
    ranked = rank_fastest([(c, s) for c, s, p in zip(configs, speedups, checks) if not p.failures(opts)])
    chosen, speedup = ranked[0]
    goal = LatencyGoal.of(ctx.budget, fp32_m.stats.median_ms)

    def choose(config: QuantConfig) -> None:
        choice["chosen"] = {"activation_type": config.activation_type, "weight_type": config.weight_type,
                            "reduce_range": config.reduce_range}

    def confirm(config: QuantConfig) -> RatioEstimate:
        """A second, fresh interleaved run: one noisy run must not decide that a slower model is faster."""
        _, (again,) = measure_speedups(fp32, [quantize(config)], ctx, fresh=True)
        log.info(f"confirmation run: {config.label()} {again.ratio:.3f}x [{again.low:.3f}, {again.high:.3f}]")
        record.setdefault("confirmations", []).append(
            {"config": config.label(), "float_layers": sorted(config.float_layers()), "speedup": again.to_json()})
        return again

    choose(chosen)
    # The fastest candidate that a second run confirms (a noisy first run may have ranked them wrongly).
    for config, first in ranked:
        if not goal.met(first):
            break
        again = confirm(config)
        if goal.met(again):
            choose(config)
            return Int8Plan(fp32, calibration, config, quantize(config), again, parity, record)
        if config is chosen:
            speedup = again  # what the errors below report
    if not opts.auto_exclude and is_faster(speedup):  # faster, but not enough for the latency budget
        raise QuantBudgetError(
            f"int8 quantization cannot meet the latency budget on this model: the fastest int8 model "
            f"({chosen.label()}) runs at {1 / speedup.ratio:.3f}x of fp32 (measured), budget {goal.max_ratio:.3f}x.",
            "Relax the budget, prune first (squeeze prune) and quantize the pruned model, or use --method haq.")
    if not opts.auto_exclude:
        raise NotFasterError(
            f"The int8 model ({chosen.label()}) is not faster than fp32 on `{ctx.target.name}`: measured speedup "
            f"{speedup.ratio:.3f}x [{speedup.low:.3f}, {speedup.high:.3f}] (95% interval, interleaved). Nothing was "
            "written.",
            "Re-run with --auto-exclude (in a recipe: `options: {auto_exclude: true}` on the quant.int8 stage) to "
            "keep the layers that quantize well and leave the others in float (measured per layer)"
            + (", or let squeeze choose the types (--activation-type auto)." if opts.activation_type != "auto" else
               "; every activation/weight type was measured already."))
    return _auto_exclude(Int8Plan(fp32, calibration, chosen, quantize(chosen), speedup, parity, record),
                         ctx, opts, goal, layers, confirm)


def _auto_exclude(plan: Int8Plan, ctx: PassContext, opts, goal: LatencyGoal, layers: list[str],
                  confirm: Callable[[QuantConfig], RatioEstimate]) -> Int8Plan:
    """Exclusion search from `plan`'s config; the result must be confirmed faster and pass the floor too,
    else the fp32 model is handed back."""
    from squeeze.quant.run import measure_speedups

    quantize = plan.quantize
    final, steps = exclusion_search(
        plan.config, layers, goal.met, lambda c: measure_speedups(plan.fp32, [quantize(c)], ctx)[1][0],
        _blame(plan.fp32, quantize, ctx, opts.profile_runs), opts.max_exclude_steps)
    below: list[str] = []
    if final is not None:
        speedup = confirm(final)
        below = plan.parity(quantize(final)).failures(opts)
        final = final if goal.met(speedup) and not below else None
    plan.record["auto_exclude"] = {"start_speedup": plan.speedup.to_json(), "steps": [s.to_json() for s in steps],
                                   "result": "quantized" if final else "fp32", "below_floor": below}
    if final is None:
        log.warning("auto-exclude found no faster int8 model within the accuracy floor; handing back the fp32 model")
        return Int8Plan(plan.fp32, plan.calibration, None, plan.fp32, None, plan.parity, plan.record)
    return Int8Plan(plan.fp32, plan.calibration, final, quantize(final), speedup, plan.parity, plan.record)


def run_int8(state: ModelState, ctx: PassContext, opts) -> tuple[ModelState, dict[str, Any]]:
    from squeeze.quant.run import check_budget, check_result_budget, check_target, describe, final_parity, run_summary
    from squeeze.model.summary import summarize

    check_target("int8", ctx.target)
    check_budget(ctx.budget, summarize(state.model).params, 1, "int8")
    plan = plan_int8(state, ctx, opts)
    fp32_ms = plan.record["type_choice"]["fp32_median_ms"]
    record = {
        "summary": run_summary("int8", plan.config, plan.speedup),
        "method": "int8",
        "config": plan.config.model_dump() if plan.config else None,
        "fallback": None if plan.config else "fp32: no int8 model was faster on the target",
        **plan.record,
        "speedup_vs_fp32": plan.speedup.to_json() if plan.speedup else None,
        "budget": check_result_budget(ctx.budget, plan.speedup, fp32_ms, plan.artifact, "int8"),
        **describe(plan.artifact, plan.fp32),
        "output_parity": final_parity("The int8 model", plan.parity, plan.artifact, opts) if plan.config else None,
    }
    state.artifact = plan.artifact
    return state, record
