"""The Python API behind the CLI: info, bench, gate, recipes, one registered method at a time (compress, prune,
quantize), a result's figures and HTML page (report), what is registered (methods, catalog), lookup tables and
target checks.

Light by design: every command imports this module, so torch and onnx load inside the functions that need them.
It also re-exports what a caller needs around these functions (the CLI reaches the core only through here):
the error type, the parsers of shapes and preprocessing flags, the target loader, the measurement protocol.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from pydantic import BaseModel

from squeeze import __version__
from squeeze.util.cache import atomic_write_bytes
from squeeze.errors import DataError, SqueezeError
from squeeze.export.artifact import OnnxArtifact
from squeeze.measure.bench import Measurement, measure
from squeeze.measure.gate import GateConfig, GateResult, gate_against_baseline, run_gate
from squeeze.measure.protocol import CONTENDED, LATENCY_TOLERANCE, Protocol
from squeeze.measure.stats import RatioEstimate, paired_ratio
from squeeze.methods import ModelState, Pass, PassContext, get_pass, list_passes
from squeeze.methods.builtin import ensure_artifact
from squeeze.outputs import check_out_dir, check_writable, write_outputs
from squeeze.preprocessing import Preprocessing, from_flags
from squeeze.progress import reporting
from squeeze.recipe import Budget, Recipe, check_runtimes, load_recipe, remaining_budget
from squeeze.util.shapes import parse_input_shape
from squeeze.target import RPC_ENV, Target, list_targets, load_target, parse_host_port, refuse_emulated_latency
from squeeze.train.config import FineTuneConfig

# torch and onnx are imported by the functions that build, export or summarize a model, so that importing
# this module (every command does) stays light.
if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing's from Python 3.11

    from squeeze.export.onnx import Exporter
    from squeeze.doctor import CheckReport
    from squeeze.measure.lut import LatencyTable
    from squeeze.model.loading import LoadedModel
    from squeeze.prune.tables import BuildResult, CheckResult
    from squeeze.model.summary import ModelSummary

__all__ = ["ModelOptions", "BenchRow", "CompressOptions", "UnknownOptionError", "info", "bench", "gate", "run_recipe",
           "load_baseline", "compress", "prune", "quantize", "reparam", "methods", "option_default", "method_options", "CATALOGS",
           "catalog", "report", "validate_recipe", "lut_build", "lut_check", "check_target", "parse_preprocessing",
           "write_json",
           # re-exported
           "__version__", "SqueezeError", "Target", "Protocol", "GateConfig", "RPC_ENV", "load_target", "list_targets",
           "parse_host_port", "parse_input_shape", "check_writable", "reporting"]

log = logging.getLogger("squeeze")

# An original scoring at most this many times chance top-1 is being fed wrongly (normalization, labels): a
# "gain" over it measures the fine-tune learning the new preprocessing, not the compression.
NEAR_CHANCE_FACTOR = 1.5
# Pruning or quantizing then fine-tuning on the same data recovers accuracy; it does not add this many points
# unless the original was fed differently from how it was trained and the fine-tune learned the new feeding.
SUSPECT_GAIN_PT = 10.0


@dataclass(frozen=True)
class ModelOptions:
    """How to load the models named on the command line."""

    input_shape: tuple[int, ...] | None = None
    weights: str | None = None
    trust: bool = False
    exporter: Exporter = "dynamo"

    def load(self, spec: str, trained: bool = True) -> LoadedModel:
        from squeeze.model.loading import load_model

        return load_model(spec, input_shape=self.input_shape, weights=self.weights, trust=self.trust, trained=trained)


@dataclass
class BenchRow:
    spec: str
    summary: ModelSummary
    artifact: OnnxArtifact
    measurement: Measurement
    speedup: RatioEstimate | None  # first model's latency / this one's, from the same interleaved run

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.spec,
            "params": self.summary.params,
            "macs": self.summary.macs,
            "size_bytes": self.summary.size_bytes,
            "artifact": self.artifact.to_json(),
            "measurement": self.measurement.to_json(),
            "speedup_vs_first": self.speedup.to_json() if self.speedup else None,
        }


def info(spec: str, opts: ModelOptions) -> ModelSummary:
    from squeeze.model.summary import summarize

    # Shapes, parameters and MACs only: a trained zoo entry is not trained for them.
    return summarize(opts.load(spec, trained=False))


def _speedup(first: Measurement, other: Measurement) -> RatioEstimate:
    """Speedup = first / other; from paired samples, so its interval inverts the latency-ratio interval."""
    r = paired_ratio(other.samples_ms, first.samples_ms)
    return RatioEstimate(r.ratio, r.low, r.high, r.confidence, r.n, r.method)


def bench(specs: list[str], target: Target, opts: ModelOptions, protocol: Protocol, use_cache: bool = True) -> list[BenchRow]:
    from squeeze.export.onnx import export_onnx
    from squeeze.model.summary import summarize

    loaded = [opts.load(s) for s in specs]
    get_runtime_check(target)
    artifacts = [export_onnx(m, exporter=opts.exporter, use_cache=use_cache) for m in loaded]
    results = measure(artifacts, target, protocol, use_cache=use_cache)
    rows = []
    for i, (spec, m, art, res) in enumerate(zip(specs, loaded, artifacts, results)):
        rows.append(BenchRow(spec, summarize(m), art, res, _speedup(results[0], res) if i else None))
    return rows


def get_runtime_check(target: Target) -> None:
    """Fail on an unusable target (missing runtime or device) before exporting anything."""
    from squeeze.measure.runtimes import get_runtime

    get_runtime(target).providers(target)


def load_baseline(path: Path) -> Measurement:
    """The first model's measurement from a `squeeze bench --json` file."""
    try:
        data = json.loads(Path(path).read_text())
        return Measurement.from_json(data["models"][0]["measurement"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise SqueezeError(
            f"--baseline {path} is not a result written by `squeeze bench --json` ({type(exc).__name__}: {exc}).",
            "Write one with `squeeze bench OLD --target T --json baseline.json` on this machine.",
        ) from exc


def gate(new_spec: str, target: Target, opts: ModelOptions, protocol: Protocol, cfg: GateConfig, *,
         old_spec: str | None = None, baseline: Path | None = None) -> GateResult:
    from squeeze.export.onnx import export_onnx

    refuse_emulated_latency(target, "a latency gate")
    get_runtime_check(target)
    new = export_onnx(opts.load(new_spec), exporter=opts.exporter)
    if baseline is not None:
        base = load_baseline(baseline)
        if base.target != target.name:
            raise SqueezeError(f"--baseline {baseline} was measured on `{base.target}`, not `{target.name}`.",
                               "Compare on the target the baseline was measured on.")
        return gate_against_baseline(new, base, target, protocol, cfg)
    old = export_onnx(opts.load(old_spec), exporter=opts.exporter)
    return run_gate(new, old, target, protocol, cfg)


def _compare(original: OnnxArtifact, final: OnnxArtifact, target: Target, protocol: Protocol,
             use_cache: bool) -> dict[str, Any]:
    """Original and final measured interleaved in one run: latencies and the speedup with its interval."""
    if original.sha256 == final.sha256:
        (m,) = measure([final], target, protocol, use_cache=use_cache)
        return {"original": m.to_json(), "final": m.to_json(), "speedup": None}
    m_orig, m_final = measure([original, final], target, protocol, use_cache=use_cache)
    return {"original": m_orig.to_json(), "final": m_final.to_json(), "speedup": _speedup(m_orig, m_final).to_json()}


def _note_contention(latency: dict[str, Any], stages: list[dict[str, Any]], model_spec: str) -> None:
    """The original's time in the final comparison over its fastest in the first search's runs (the same target
    and protocol) as `latency["contention"]`, with a warning over CONTENDED: a contended machine slows small
    models more than large ones, so the verdict's ratio reads high."""
    record = (stages[0].get("record") or {}) if stages else {}
    fastest = record.get("original_fastest_ms") if isinstance(record, dict) else None
    if fastest is None or latency["speedup"] is None:
        return
    ms = latency["original"]["stats"]["median_ms"]
    latency["contention"] = contention = max(ms / fastest, 1.0)
    if contention > CONTENDED:
        latency["warning"] = (
            f"the machine ran {contention:.2f}x slower as the result was compared with the original than at its "
            f"quietest in the search (the original took {ms:.4g} ms, at best {fastest:.4g}): a contended machine "
            "slows small models more than large ones, so this ratio reads high. Compare the two again on a quiet "
            f"machine: squeeze bench {model_spec} OUT/model.onnx")


# Profiled runs of each model for the per-layer breakdown: enough to rank layers, whose times are shown as shares.
PROFILE_RUNS = 20


def _layer_profile(original: OnnxArtifact, final: OnnxArtifact, target: Target, protocol: Protocol,
                   latency: dict[str, Any]) -> dict[str, Any] | None:
    """Per layer, the original's and the result's ms: the layer's share of the kernel time in ONNX Runtime's
    profile of both (interleaved), each node's time less what the profiler adds to it, times the model's median in
    the comparison run (profiling slows a run about 2x, so its own times are good for shares only). None where
    nothing changed."""
    if original.sha256 == final.sha256:
        return None
    if target.runtime != "onnxruntime":
        return {"skipped": f"per-layer times come from ONNX Runtime's profiler, and `{target.name}` runs "
                           f"{target.runtime}"}
    from squeeze.measure.profile import profile_artifacts, profiler_overhead_us

    overhead = profiler_overhead_us(tuple(target.providers), protocol.threads)
    profiles = profile_artifacts([original, final], target.providers, protocol, PROFILE_RUNS, overhead)
    scaled = []
    for profile, key in zip(profiles, ("original", "final")):
        ms_per_us = latency[key]["stats"]["median_ms"] / profile.total_us
        scaled.append(({layer: us * ms_per_us for layer, us in profile.layer_us.items()},
                       profile.other_us * ms_per_us))
    (before, other_before), (after, other_after) = scaled
    return {"source": "onnxruntime profiler", "runs": PROFILE_RUNS,
            "layers": [{"layer": name, "original_ms": before.get(name, 0.0), "final_ms": after.get(name, 0.0)}
                       for name in dict.fromkeys([*before, *after])],
            "other_ms": {"original": other_before, "final": other_after}}


def _load_run_data(recipe: Recipe, model: LoadedModel, data_spec: str | None,
                   preprocessing: Preprocessing | None) -> tuple[Any, str | None]:
    """The run's data and where its normalization came from: `given` (flags, recipe), `model` (recorded in
    its checkpoint) or `default` (neither: squeeze's default for the data source)."""
    section = recipe.data
    spec = data_spec or (section.spec if section else None)
    if spec is None:
        return None, None
    from squeeze.data import load_data

    asked = (preprocessing or Preprocessing()).over(section.preprocessing() if section else None)
    recorded = model.preprocessing
    data = load_data(spec, input_shape=model.input_shape, preprocessing=asked.over(recorded))
    _check_classes(model, data)
    source = "given" if asked.normalize else "model" if recorded and recorded.normalize else "default"
    return data, source


def _check_classes(model: LoadedModel, data) -> None:
    """Labels the model cannot predict would make every fine-tune step fail (or, worse, train the wrong head):
    refused before any work."""
    if model.module is None:
        return
    import torch

    with torch.no_grad():
        out = model.module(model.example_input())
    outputs = out.shape[-1] if out.ndim == 2 else None
    if outputs is not None and data.num_classes > outputs:
        raise DataError(
            f"--data `{data.spec}` has {data.num_classes} classes but the model has {outputs} outputs: it cannot "
            f"predict labels {outputs}..{data.num_classes - 1}.",
            "Pass the data set the model was trained on (same classes, same order), or a model with a head of "
            f"{data.num_classes} outputs.")


def _original_top1(original: OnnxArtifact, data) -> float | None:
    """The original's top-1 on the data, before any pass runs, so a mis-fed model is flagged at once."""
    if data is None:
        return None
    from squeeze.train import evaluate_onnx

    top1 = evaluate_onnx(original, data.held_out()[1]).top1
    warning = _near_chance_warning(top1, data)
    if warning:
        log.warning(warning)
    return top1


def _near_chance_warning(top1: float, data) -> str | None:
    chance = 1 / data.num_classes
    if top1 > NEAR_CHANCE_FACTOR * chance:
        return None
    return (f"the original scores {100 * top1:.1f}% top-1 on --data {data.spec}, near chance ({100 * chance:.0f}% for "
            f"{data.num_classes} classes): the preprocessing ({data.preprocessing.describe()}) or the labels are "
            "probably wrong; pass --normalize with what the model was trained with (e.g. --normalize 0.5,0.5)")


def _accuracy(original_top1: float | None, final: OnnxArtifact, data) -> dict[str, Any] | None:
    """Top-1 of the exported ONNX files themselves (what ships), on the test split (val if none)."""
    if data is None:
        return None
    from squeeze.train import evaluate_onnx

    split, ds = data.held_out()
    after = evaluate_onnx(final, ds)
    delta_pt = 100 * (after.top1 - original_top1)
    near_chance = _near_chance_warning(original_top1, data)
    warning = near_chance or (_gain_warning(delta_pt, data) if delta_pt > SUSPECT_GAIN_PT else None)
    if warning and not near_chance:  # the near-chance one was logged before the passes ran
        log.warning(warning)
    # No delta over a near-chance original: it would read as a gain the compression never made.
    return {"split": split, "n": after.n, "original_top1": original_top1, "final_top1": after.top1,
            "delta_pt": None if near_chance else delta_pt, "original_near_chance": near_chance is not None,
            "warning": warning}


def _gain_warning(delta_pt: float, data) -> str:
    return (f"the compressed model scores {delta_pt:+.1f} pt above the original on --data {data.spec}: compression "
            f"does not add that much; the fine-tune most likely learned this preprocessing "
            f"({data.preprocessing.describe()}), which the original was not trained with; pass --normalize with the "
            "original's (e.g. --normalize 0.5,0.5)")


def run_recipe(recipe_ref: str | Recipe, model_spec: str, out_dir: Path, opts: ModelOptions, *,
               target_name: str | None = None, data_spec: str | None = None,
               preprocessing: Preprocessing | None = None, use_cache: bool = True,
               force: bool = False, resume: bool = False) -> dict[str, Any]:
    """Validate the recipe, load model and data, run the stages, compare with the original, write outputs.

    `data_spec` and `preprocessing` win over the recipe's `data:`, which wins over what the model's
    checkpoint recorded. Writes model.onnx, report.json, its figures and report.html (and model.pt, a squeeze
    checkpoint recording the preprocessing, when a stage changed the architecture) to out_dir, all or nothing;
    an out_dir that already holds files is refused before any work unless `force`. A resumable stage saves its
    progress next to out_dir as it goes; `resume` continues a stopped run of the same arguments from it.
    """
    from squeeze.export.onnx import export_onnx
    from squeeze.measure.oracle import MeasuredOracle
    from squeeze.model.loading import checkpoint_bytes
    from squeeze.model.summary import summarize
    from squeeze.prune.resume import keep_finished, open_run, reuse_finished, run_fingerprint
    from squeeze.report.html import report_files

    recipe = load_recipe(recipe_ref) if isinstance(recipe_ref, str) else recipe_ref
    if preprocessing is not None and not (data_spec or recipe.data):
        raise SqueezeError("--normalize/--resize say how --data is fed to the model, but no data is given.",
                           "Pass --data (digits, a folder, package.module:function), or leave them out.")
    target = load_target(target_name or recipe.target or "host-cpu")
    check_runtimes(recipe, target)
    if any(b.latency_ms is not None or b.latency_ratio is not None for b in recipe.budgets()):
        refuse_emulated_latency(target, "a latency budget")
    check_out_dir(out_dir, force)
    fingerprint = run_fingerprint(recipe, model_spec, opts.weights, opts.input_shape, target.name, data_spec,
                                  preprocessing)
    checkpoints = open_run(out_dir, fingerprint, [get_pass(s.method) for s in recipe.stages], resume, force)
    get_runtime_check(target)
    protocol = Protocol.for_target(target, **recipe.measure.model_dump())
    model = opts.load(model_spec)
    data, preprocessing_source = _load_run_data(recipe, model, data_spec, preprocessing)
    ctx = PassContext(target, MeasuredOracle(target, protocol, use_cache), protocol, recipe.export, recipe.budget,
                      data=data, use_cache=use_cache)
    state = ModelState(model)
    original_artifact = export_onnx(model, exporter=recipe.export.exporter, atol=recipe.export.atol,
                                    rtol=recipe.export.rtol, use_cache=use_cache)
    original_top1 = _original_top1(original_artifact, data)
    original = summarize(model)
    stages = []
    for index, stage in enumerate(recipe.stages):
        t0 = time.perf_counter()
        ctx.checkpoint = checkpoints.stage(index)
        if (entry := reuse_finished(ctx.checkpoint, state)) is not None:
            stages.append(entry)
            continue
        ctx.budget = stage.budget if stage.own_budget else recipe.budget
        if not stage.own_budget and recipe.budget and index:  # what the earlier stages left of the recipe's
            reached = _reached(recipe.budget, original, original_artifact, state, ctx)
            ctx.budget = remaining_budget(recipe.budget, reached)
        received = state.model
        try:
            state, record = get_pass(stage.method)(stage.typed_options()).run(state, ctx)
        except SqueezeError as exc:
            if any(i < index for i in checkpoints.kept()):  # a later stage's fix need not cost the searches before
                exc.fix = (f"{exc.fix} The stages before it are kept in {checkpoints.folder}: the same command "
                           f"with --resume (once fixed) reuses them and starts at stage {index + 1} ({stage.method}).")
            raise
        stages.append({"method": stage.method, "seconds": round(time.perf_counter() - t0, 3), "record": record,
                       "budget": ctx.budget.model_dump(exclude_none=True) if ctx.budget else None,
                       "budget_from": "stage" if stage.own_budget else "recipe" if recipe.budget else None})
        keep_finished(ctx.checkpoint, received, state, stages[-1])
    state = ensure_artifact(state, ctx)
    final = summarize(state.model)
    latency = _compare(original_artifact, state.artifact, target, protocol, use_cache)
    _note_contention(latency, stages, model_spec)
    layer_profile = _layer_profile(original_artifact, state.artifact, target, protocol, latency)
    report = {
        "recipe": recipe.name,
        "model": model_spec,
        "target": target.name,
        "data": {**data.to_json(), "preprocessing_source": preprocessing_source} if data else None,
        # size_bytes: the torch model's fp32 weights; onnx_bytes: the file shipped (what quantization shrinks)
        "original": {**original.to_json(), "onnx_bytes": original_artifact.path.stat().st_size},
        "final": {**final.to_json(), "onnx_bytes": state.artifact.path.stat().st_size},
        "artifact": {**state.artifact.to_json(), "path": str(Path(out_dir) / "model.onnx")},
        "latency": latency,
        **({"layer_profile": layer_profile} if layer_profile else {}),
        "accuracy": _accuracy(original_top1, state.artifact, data),
        "measurements": {k: m.to_json() for k, m in state.measurements.items()},
        "stages": stages,
        "budget": _budget_met(recipe.budget, original, final, state.artifact, latency,
                              counted_size=_counted_size(stages)) if recipe.budget else None,
    }
    if original.macs and final.macs and original.macs != final.macs:  # pruning; quantization keeps the MACs
        report["macs_reduction"] = original.macs / final.macs
    files: dict[str, bytes | Path] = {"model.onnx": state.artifact.path, "report.json": json.dumps(report, indent=2).encode()}
    files |= report_files(report)  # figures and report.html, drawn from the report as written
    if state.model.plans:
        # The weights were fine-tuned and evaluated on data fed this way: a later --data reuses it.
        state.model.preprocessing = data.preprocessing if data else model.preprocessing
        files["model.pt"] = checkpoint_bytes(state.model)
    report["written"] = [str(p) for p in write_outputs(out_dir, files, force)]
    checkpoints.discard()
    return report


def _reached(budget: Budget, original: ModelSummary, original_artifact: OnnxArtifact, state: ModelState,
             ctx: PassContext) -> dict[str, float]:
    """The ratios to the original that the model a stage receives has reached, for the budget's ratio keys:
    MACs counted, latency measured interleaved with the original."""
    from squeeze.model.summary import summarize

    reached = {}
    if budget.macs_ratio is not None:
        reached["macs_ratio"] = summarize(state.model).macs / original.macs
    if budget.latency_ratio is not None:
        state = ensure_artifact(state, ctx)
        speedup = _compare(original_artifact, state.artifact, ctx.target, ctx.protocol, ctx.use_cache)["speedup"]
        reached["latency_ratio"] = 1 / speedup["ratio"] if speedup else 1.0
    return reached


def _counted_size(stages: list[dict[str, Any]]) -> float | None:
    """The last stage's weights counted at their bits, where it ran below 8 bits (HAQ): the size its budget
    limits, which the ONNX file, storing such weights as int8, does not show."""
    record = stages[-1]["record"] if stages else None
    counted = record.get("counted_size_bytes") if isinstance(record, dict) else None
    return counted["final"] if counted else None


def _budget_met(budget: Budget, original: ModelSummary, final: ModelSummary, artifact: OnnxArtifact,
                latency: dict[str, Any], counted_size: float | None = None) -> dict[str, Any]:
    """The recipe's budget against the final model: latency measured (median; ratio from the interleaved run
    against the original; met within LATENCY_TOLERANCE, as the searches claim it), MACs counted, size the
    shipped ONNX file (or the weights at their bits, where a mixed-precision stage counted them: `size_from`
    says which)."""
    speedup = latency["speedup"]
    value_of = {"latency_ms": lambda: latency["final"]["stats"]["median_ms"],
                "latency_ratio": lambda: 1 / speedup["ratio"] if speedup else 1.0,
                "macs_ratio": lambda: final.macs / original.macs,
                "size_bytes": lambda: counted_size if counted_size is not None else artifact.path.stat().st_size}
    limits = budget.model_dump(exclude_none=True)
    reached = {k: value_of[k]() for k in limits}
    slack = {k: LATENCY_TOLERANCE if k.startswith("latency") else 1.0 for k in limits}
    missed = [k for k, limit in limits.items() if reached[k] > slack[k] * limit]
    if missed:
        log.warning("the final model misses the recipe's budget: " + ", ".join(
            f"{k} {reached[k]:.4g} > {limits[k]:.4g}" for k in missed))
    met = {"limits": limits, "final": reached, "met": not missed, "missed": missed}
    if any(k.startswith("latency") for k in limits):
        met["latency_tolerance"] = round(LATENCY_TOLERANCE - 1, 4)
    if "size_bytes" in limits:
        met["size_from"] = "weights counted at their bits" if counted_size is not None else "the shipped ONNX file"
    return met


class CompressOptions(TypedDict, total=False):
    """What `prune` and `quantize` take besides the method and the budget, as `compress` does."""

    target: str
    data: str | None
    options: dict[str, Any] | None  # the method's typed options, validated against its options class
    model_options: ModelOptions | None
    preprocessing: Preprocessing | None
    measure: dict[str, Any] | None  # protocol overrides: repeat, warmup, min_repeat_ms, batch_size
    use_cache: bool
    force: bool
    resume: bool  # continue a stopped run of a resumable method (netadapt) with the same arguments


def compress(model_spec: str, out_dir: str | Path, method: str, *, target: str = "host-cpu",
             budget: Budget | None = None, data: str | None = None, options: dict[str, Any] | None = None,
             model_options: ModelOptions | None = None, preprocessing: Preprocessing | None = None,
             measure: dict[str, Any] | None = None, use_cache: bool = True, force: bool = False,
             resume: bool = False, name: str | None = None) -> dict[str, Any]:
    """One registered method (`prune.netadapt`, `quant.int8`, ...) as a one-stage recipe, so that the CLI, a
    recipe and a notebook run the same thing. Returns the report (also written to out_dir/report.json).

    Option values are validated against the method's options class before any model is loaded
    (pydantic.ValidationError names the bad key). `name` is the recipe's (default: the method's, dashed).
    """
    from squeeze.recipe import MeasureOverrides, Stage

    get_pass(method)  # an unknown method lists the registered ones
    recipe = Recipe(name=name or method.replace(".", "-"), target=target, budget=budget, data=data,
                    stages=[Stage(method=method, options=options or {})],
                    measure=MeasureOverrides(**(measure or {})))
    recipe.stages[0].typed_options()
    return run_recipe(recipe, model_spec, Path(out_dir), model_options or ModelOptions(), preprocessing=preprocessing,
                      use_cache=use_cache, force=force, resume=resume)


def _budget(latency: float | None, latency_ms: float | None, macs: float | None,
            size_bytes: int | None) -> Budget | None:
    if all(v is None for v in (latency, latency_ms, macs, size_bytes)):
        return None
    return Budget(latency_ratio=latency, latency_ms=latency_ms, macs_ratio=macs, size_bytes=size_bytes)


def prune(model_spec: str, out_dir: str | Path, *, method: str = "netadapt", latency: float | None = None,
          latency_ms: float | None = None, macs: float | None = None, size_bytes: int | None = None,
          **kwargs: Unpack[CompressOptions]) -> dict[str, Any]:
    """`squeeze prune` for code: e.g. `squeeze.api.prune("zoo:digits-cnn", "out", latency=0.5, data="digits")`.
    Budgets are ratios of the original (latency, macs) or absolute (latency_ms, size_bytes); the other keyword
    arguments are `compress`'s (options= takes the method's typed options)."""
    importance = (kwargs.get("options") or {}).get("importance")
    if importance is not None:
        from squeeze.prune.importance import get_importance

        get_importance(importance)  # an unknown criterion fails before any model is loaded
    return compress(model_spec, out_dir, f"prune.{method}", budget=_budget(latency, latency_ms, macs, size_bytes),
                    name=f"prune-{method}", **kwargs)


def quantize(model_spec: str, out_dir: str | Path, *, method: str = "int8", latency: float | None = None,
             latency_ms: float | None = None, size_bytes: int | None = None,
             **kwargs: Unpack[CompressOptions]) -> dict[str, Any]:
    """`squeeze quantize` for code: e.g. `squeeze.quantize("model.pt", "out", data="digits")`. A target that cannot
    run the precision fast, or static quantization without calibration data, fails before any model is loaded."""
    from squeeze.quant.run import MissingCalibrationDataError, check_target

    get_pass(f"quant.{method}")
    if method in ("int8", "fp16", "qat"):
        check_target(method, load_target(kwargs.get("target", "host-cpu")))
    if kwargs.get("data") is None and method != "fp16":
        raise MissingCalibrationDataError(
            f"--method {method} needs calibration data (--data): static quantization measures each activation's "
            "range on real samples, and the accuracy of the result is reported on held-out ones.",
            "Pass --data digits, a folder of class sub-folders, or package.module:function.")
    return compress(model_spec, out_dir, f"quant.{method}", budget=_budget(latency, latency_ms, None, size_bytes),
                    name=f"quantize-{method}", **kwargs)


def reparam(model_spec: str, out_dir: str | Path, *, method: str = "ghost", latency: float | None = None,
            latency_ms: float | None = None, macs: float | None = None, size_bytes: int | None = None,
            **kwargs: Unpack[CompressOptions]) -> dict[str, Any]:
    """`squeeze reparam` for code: e.g. `squeeze.api.reparam("zoo:fashion-cnn", "out", data="fashion-mnist")`.
    Without a budget, each layer is replaced where its replacement is measured faster on the target."""
    get_pass(f"reparam.{method}")
    if kwargs.get("data") is None:
        raise DataError(f"--method {method} needs data (--data): the replacements are fitted to the trained layers' "
                        "responses on training images, fine-tuned, and the result's accuracy is reported.",
                        "Pass --data digits, fashion-mnist, a folder of class sub-folders, or package.module:function.")
    if latency is not None or latency_ms is not None:
        refuse_emulated_latency(load_target(kwargs.get("target", "host-cpu")), "a latency budget")
    return compress(model_spec, out_dir, f"reparam.{method}", budget=_budget(latency, latency_ms, macs, size_bytes),
                    name=f"reparam-{method}", **kwargs)


# What is registered, and the options a method takes.

def methods(family: str) -> list[type[Pass]]:
    """The registered methods of a family (`prune`, `quant`), plugins included, in name order."""
    return [p for p in list_passes() if p.name.startswith(f"{family}.")]


def option_default(method: type[Pass], key: str) -> Any:
    """The default of a method's option (None for a required one); a dotted key reaches into nested options
    (`short_term.iterations`). KeyError when the method has no such option."""
    head, *rest = key.split(".")
    field = method.Options.model_fields.get(head)
    if field is None:
        raise KeyError(key)
    value = None if field.is_required() else field.get_default(call_default_factory=True)
    for part in rest:
        if not isinstance(value, BaseModel) or part not in type(value).model_fields:
            raise KeyError(key)
        value = getattr(value, part)
    return value


class UnknownOptionError(SqueezeError):
    """A key the method's options class does not have (`key`: the top-level name asked for)."""

    def __init__(self, method: type[Pass], key: str) -> None:
        self.key, self.accepted = key, list(method.Options.model_fields)
        super().__init__(f"`{key}` is not an option of {method.name}.", f"Its options: {', '.join(self.accepted) or 'none'}.")


def method_options(method: type[Pass], values: Mapping[str, Any]) -> dict[str, Any]:
    """Options for `compress` from dotted keys: `{"short_term.iterations": 50}` sets that one value and keeps
    the method's defaults for the rest of `short_term` (its optimizer, learning rate; `long_term.iterations`
    replaces a default budget in epochs, and the reverse). Values are checked by
    the method's options class when the recipe is validated; a key it does not have is an UnknownOptionError."""
    options: dict[str, Any] = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head not in method.Options.model_fields:
            raise UnknownOptionError(method, head)
        if not rest:
            options[head] = value
            continue
        if head not in options:
            default = option_default(method, head)
            options[head] = default.model_dump(exclude_unset=True) if isinstance(default, BaseModel) else {}
        _set_dotted(options[head], rest, value)
        other = {"epochs": "iterations", "iterations": "epochs"}.get(rest)
        if other and f"{head}.{other}" not in values and isinstance(option_default(method, head), FineTuneConfig):
            options[head].pop(other, None)  # a fine-tune's budget is one of the two: the one given replaces the default's
    return options


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


CATALOGS = ("methods", "models", "targets", "recipes", "runtimes", "importances")


def catalog(kind: str) -> list[tuple[str, str]]:
    """(name, description) of everything registered of one kind (CATALOGS), for `squeeze list`."""
    if kind not in CATALOGS:
        raise SqueezeError(f"Cannot list `{kind}`.", f"Choose one of: {', '.join(CATALOGS)}.")
    if kind == "methods":
        return [(p.name, p.summary) for p in list_passes()]
    if kind == "models":
        from squeeze.model.zoo.index import list_models

        return [(f"zoo:{e.name}", f"{e.description} (input {'x'.join(map(str, e.input_shape))})") for e in list_models()]
    if kind == "targets":
        return [(t.name, t.description) for t in list_targets()]
    if kind == "recipes":
        from squeeze.util.resources import data_dir

        return [(p.stem, load_recipe(str(p)).description) for p in sorted(data_dir("recipes").glob("*.yaml"))]
    if kind == "importances":
        from squeeze.prune.importance import list_importances  # imports torch: the criteria score tensors

        return [(c.name, c.summary) for c in list_importances()]
    from squeeze.measure.runtimes import list_runtimes

    return [(r, "") for r in list_runtimes()]


def report(results: list[str | Path], out_dir: str | Path | None = None, force: bool = False) -> list[Path]:
    """`squeeze report`: one result's figures and report.html rebuilt from its report.json, into its own folder
    (only those files are replaced) or into `out_dir`; two results as `out_dir`/compare.html, side by side.
    Returns the files written. A folder without a readable report.json is a SqueezeError naming it."""
    from squeeze.report.html import COMPARE_HTML, compare_html, read_report, report_files

    if len(results) not in (1, 2):
        raise SqueezeError(f"`squeeze report` takes one result folder or two to compare, not {len(results)}.",
                           "Pass DIR to rebuild its report, or A B --out C to compare two.")
    if len(results) == 2 and out_dir is None:
        raise SqueezeError("Comparing two results writes compare.html to a folder of its own.", "Pass --out FOLDER.")
    reports = [read_report(Path(r)) for r in results]
    if len(reports) == 1:
        own = out_dir is None
        return write_outputs(Path(results[0] if own else out_dir), report_files(reports[0]), force or own)
    page = compare_html(reports[0], reports[1], (str(results[0]), str(results[1])))
    return write_outputs(Path(out_dir), {COMPARE_HTML: page.encode()}, force)


def validate_recipe(recipe_ref: str) -> Recipe:
    """A recipe file (or shipped name) checked without loading any model: its schema, methods, options, target."""
    recipe = load_recipe(recipe_ref)
    if recipe.target:
        check_runtimes(recipe, load_target(recipe.target))
    return recipe


# Lookup tables and target checks.

def _lut_setup(model_spec: str, target: Target, opts: ModelOptions,
               batch_size: int | None) -> tuple[LoadedModel, LatencyTable]:
    from squeeze.measure.lut import LatencyTable

    get_runtime_check(target)
    return opts.load(model_spec), LatencyTable(target, batch_size=batch_size or target.protocol.batch_size)


def lut_build(model_spec: str, target: Target, opts: ModelOptions, round_to: int = 8, single_layer: bool = False,
              batch_size: int | None = None) -> tuple[LoadedModel, LatencyTable, BuildResult]:
    """Measure the layer configurations a pruning search on the model meets; stored entries are reused."""
    from squeeze.prune.tables import build_table

    loaded, table = _lut_setup(model_spec, target, opts, batch_size)
    return loaded, table, build_table(loaded, table, round_to, single_layer)


def lut_check(model_spec: str, target: Target, opts: ModelOptions, plans: int = 10, seed: int = 0, round_to: int = 8,
              batch_size: int | None = None, in_context: bool = True,
              fit_on: int | None = None) -> tuple[LoadedModel, LatencyTable, CheckResult]:
    """Random pruning plans, latency predicted by the table and measured: how wrong the table is here; the first
    `fit_on` (tables.FIT_ON) recalibrate it."""
    from squeeze.prune.tables import FIT_ON, check_table

    fit_on = FIT_ON if fit_on is None else fit_on
    if fit_on >= plans:
        raise SqueezeError(f"--fit-on {fit_on} leaves none of the {plans} plans to check the recalibrated table on.",
                           f"Pass more --plans than --fit-on, e.g. --plans {fit_on + 10}.")
    loaded, table = _lut_setup(model_spec, target, opts, batch_size)
    return loaded, table, check_table(loaded, table, plans, seed, round_to, in_context=in_context, fit_on=fit_on)


def check_target(target: Target) -> CheckReport:
    """A tiny model through the target's whole path (runtime, export, latency): which steps work."""
    from squeeze.doctor import check_target as run_check

    return run_check(target)


# Small helpers around the functions above.

def parse_preprocessing(normalize: str | None, resize: str | None) -> Preprocessing | None:
    """--normalize/--resize as a Preprocessing (None when neither is given); a bad value is a SqueezeError."""
    if normalize is None and resize is None:
        return None
    return from_flags(normalize, resize)


def write_json(path: str | Path, data: Any) -> None:
    """`data` as indented JSON, written atomically (a reader never sees half a file)."""
    atomic_write_bytes(Path(path), json.dumps(data, indent=2, default=str).encode())


def proxy_check(model_spec: str, method: str, data: str, opts: ModelOptions, *, candidates: int = 12,
                seed: int = 0, base_ratios: Sequence[float] | None = None, workers: int | None = None,
                ray_address: str | None = None) -> dict[str, Any]:
    """`squeeze proxy check`: how well each cheap evaluation setting ranks `method`'s candidates against the full
    one on this model and data; the rho of each is kept for the searches' reports. `base_ratios`: the depths
    (default: NetAdapt's candidates cut from the original and from the model at 40% of its channels, where a
    late iteration compares them; AMC's policies start from the original). `workers` / `ray_address`: the
    candidates are fine-tuned as Ray tasks (squeeze.util.workers)."""
    from squeeze.data import load_data
    from squeeze.prune.proxy import proxy_check as check
    from squeeze.prune.proxy import record_rho, rho_key
    from squeeze.util.workers import Workers

    if method not in ("netadapt", "amc"):
        raise SqueezeError(f"`squeeze proxy check` knows the candidates of netadapt and amc, not `{method}`.",
                           "Pass --method netadapt or --method amc.")
    pool = Workers(workers, ray_address)  # a missing Ray or cluster fails before any work
    model = opts.load(model_spec)
    bundle = load_data(data, input_shape=model.input_shape, preprocessing=Preprocessing().over(model.preprocessing))
    _check_classes(model, bundle)
    short_term = get_pass("prune.netadapt").Options().short_term if method == "netadapt" else None
    with pool:
        result = check(model, bundle, method, candidates, short_term, seed=seed, workers=pool,
                       base_ratios=base_ratios or ((1.0, 0.4) if method == "netadapt" else (1.0,)))
    for row in result.rows:  # the rho a search's report quotes is the one measured on the original's candidates
        if row.base_ratio == 1:
            record_rho(rho_key(model.name, bundle.spec, method), row.proxy, row.agreement)
    return {"model": model_spec, "data": bundle.spec, **result.to_json(), "evaluation": pool.describe()}
