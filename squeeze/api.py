"""The Python API behind the CLI: info, bench, gate, recipes, and one registered method at a time (compress,
prune, quantize)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeeze.errors import DataError, SqueezeError
from squeeze.export.artifact import OnnxArtifact
from squeeze.measure.bench import Measurement, measure
from squeeze.measure.gate import GateConfig, GateResult, gate_against_baseline, run_gate
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import RatioEstimate, paired_ratio
from squeeze.outputs import check_out_dir, write_outputs
from squeeze.methods import ModelState, PassContext, get_pass
from squeeze.methods.builtin import ensure_artifact
from squeeze.preprocessing import Preprocessing
from squeeze.recipe import Budget, Recipe, load_recipe
from squeeze.target import Target, load_target, refuse_emulated_latency

# torch and onnx are imported by the functions that build, export or summarize a model, so that importing
# this module (every command does) stays light.
if TYPE_CHECKING:
    from squeeze.export.onnx import Exporter
    from squeeze.model import LoadedModel
    from squeeze.summary import ModelSummary

__all__ = ["ModelOptions", "BenchRow", "info", "bench", "gate", "run_recipe", "load_baseline", "compress", "prune",
           "quantize"]

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

    def load(self, spec: str) -> LoadedModel:
        from squeeze.model import load_model

        return load_model(spec, input_shape=self.input_shape, weights=self.weights, trust=self.trust)


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
    from squeeze.summary import summarize

    return summarize(opts.load(spec))


def _speedup(first: Measurement, other: Measurement) -> RatioEstimate:
    """Speedup = first / other; from paired samples, so its interval inverts the latency-ratio interval."""
    r = paired_ratio(other.samples_ms, first.samples_ms)
    return RatioEstimate(r.ratio, r.low, r.high, r.confidence, r.n, r.method)


def bench(specs: list[str], target: Target, opts: ModelOptions, protocol: Protocol, use_cache: bool = True) -> list[BenchRow]:
    from squeeze.export.onnx import export_onnx
    from squeeze.summary import summarize

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
               force: bool = False) -> dict[str, Any]:
    """Validate the recipe, load model and data, run the stages, compare with the original, write outputs.

    `data_spec` and `preprocessing` win over the recipe's `data:`, which wins over what the model's
    checkpoint recorded. Writes model.onnx and report.json (and model.pt, a squeeze checkpoint recording
    the preprocessing, when a stage changed the architecture) to out_dir, all or nothing; an out_dir that
    already holds files is refused before any work unless `force`.
    """
    from squeeze.export.onnx import export_onnx
    from squeeze.measure.oracle import MeasuredOracle
    from squeeze.model import checkpoint_bytes
    from squeeze.summary import summarize

    recipe = load_recipe(recipe_ref) if isinstance(recipe_ref, str) else recipe_ref
    if preprocessing is not None and not (data_spec or recipe.data):
        raise SqueezeError("--normalize/--resize say how --data is fed to the model, but no data is given.",
                           "Pass --data (digits, a folder, package.module:function), or leave them out.")
    target = load_target(target_name or recipe.target or "host-cpu")
    if recipe.budget and (recipe.budget.latency_ms is not None or recipe.budget.latency_ratio is not None):
        refuse_emulated_latency(target, "a latency budget")
    check_out_dir(out_dir, force)
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
    stages = []
    for stage in recipe.stages:
        t0 = time.perf_counter()
        state, record = get_pass(stage.method)(stage.typed_options()).run(state, ctx)
        stages.append({"method": stage.method, "seconds": round(time.perf_counter() - t0, 3), "record": record})
    state = ensure_artifact(state, ctx)
    original, final = summarize(model), summarize(state.model)
    report = {
        "recipe": recipe.name,
        "model": model_spec,
        "target": target.name,
        "data": {**data.to_json(), "preprocessing_source": preprocessing_source} if data else None,
        # size_bytes: the torch model's fp32 weights; onnx_bytes: the file shipped (what quantization shrinks)
        "original": {**original.to_json(), "onnx_bytes": original_artifact.path.stat().st_size},
        "final": {**final.to_json(), "onnx_bytes": state.artifact.path.stat().st_size},
        "artifact": {**state.artifact.to_json(), "path": str(Path(out_dir) / "model.onnx")},
        "latency": _compare(original_artifact, state.artifact, target, protocol, use_cache),
        "accuracy": _accuracy(original_top1, state.artifact, data),
        "measurements": {k: m.to_json() for k, m in state.measurements.items()},
        "stages": stages,
    }
    if original.macs and final.macs and original.macs != final.macs:  # pruning; quantization keeps the MACs
        report["macs_reduction"] = original.macs / final.macs
    files: dict[str, bytes | Path] = {"model.onnx": state.artifact.path, "report.json": json.dumps(report, indent=2).encode()}
    if state.model.plans:
        # The weights were fine-tuned and evaluated on data fed this way: a later --data reuses it.
        state.model.preprocessing = data.preprocessing if data else model.preprocessing
        files["model.pt"] = checkpoint_bytes(state.model)
    report["written"] = [str(p) for p in write_outputs(out_dir, files, force)]
    return report


def compress(model_spec: str, out_dir: str | Path, method: str, *, target: str = "host-cpu",
             budget: Budget | None = None, data: str | None = None, options: dict[str, Any] | None = None,
             model_options: ModelOptions | None = None, preprocessing: Preprocessing | None = None,
             measure: dict[str, Any] | None = None, use_cache: bool = True, force: bool = False) -> dict[str, Any]:
    """One registered method (`prune.netadapt`, `quant.int8`, ...) as a one-stage recipe, so that the CLI, a
    recipe and a notebook run the same thing. Returns the report (also written to out_dir/report.json).

    Option values are validated against the method's options class before any model is loaded
    (pydantic.ValidationError names the bad key).
    """
    from squeeze.recipe import MeasureOverrides, Stage

    get_pass(method)  # an unknown method lists the registered ones
    recipe = Recipe(name=method.replace(".", "-"), target=target, budget=budget, data=data,
                    stages=[Stage(method=method, options=options or {})],
                    measure=MeasureOverrides(**(measure or {})))
    recipe.stages[0].typed_options()
    return run_recipe(recipe, model_spec, Path(out_dir), model_options or ModelOptions(), preprocessing=preprocessing,
                      use_cache=use_cache, force=force)


def _budget(latency: float | None, latency_ms: float | None, macs: float | None,
            size_bytes: int | None) -> Budget | None:
    if all(v is None for v in (latency, latency_ms, macs, size_bytes)):
        return None
    return Budget(latency_ratio=latency, latency_ms=latency_ms, macs_ratio=macs, size_bytes=size_bytes)


def prune(model_spec: str, out_dir: str | Path, *, method: str = "netadapt", latency: float | None = None,
          latency_ms: float | None = None, macs: float | None = None, size_bytes: int | None = None,
          **kwargs: Any) -> dict[str, Any]:
    """`squeeze prune` for code: e.g. `squeeze.prune("zoo:digits-cnn", "out", latency=0.5, data="digits")`.
    Budgets are ratios of the original (latency, macs) or absolute (latency_ms, size_bytes); the other keyword
    arguments are `compress`'s (options= takes the method's typed options)."""
    return compress(model_spec, out_dir, f"prune.{method}", budget=_budget(latency, latency_ms, macs, size_bytes),
                    **kwargs)


def quantize(model_spec: str, out_dir: str | Path, *, method: str = "int8", latency: float | None = None,
             latency_ms: float | None = None, size_bytes: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """`squeeze quantize` for code: e.g. `squeeze.quantize("model.pt", "out", data="digits")`."""
    return compress(model_spec, out_dir, f"quant.{method}", budget=_budget(latency, latency_ms, None, size_bytes),
                    **kwargs)
