"""The Python API behind the CLI: info, bench, gate, recipes."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.export.artifact import OnnxArtifact
from squeeze.export.onnx import Exporter, export_onnx
from squeeze.measure.bench import Measurement, measure
from squeeze.measure.gate import GateConfig, GateResult, gate_against_baseline, run_gate
from squeeze.measure.oracle import MeasuredOracle
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import RatioEstimate, paired_ratio
from squeeze.model import LoadedModel, checkpoint_bytes, load_model
from squeeze.outputs import check_out_dir, write_outputs
from squeeze.passes import ModelState, PassContext, get_pass
from squeeze.passes.builtin import ensure_artifact
from squeeze.recipe import Recipe, load_recipe
from squeeze.summary import ModelSummary, summarize
from squeeze.target import Target, load_target, refuse_emulated_latency

__all__ = ["ModelOptions", "BenchRow", "info", "bench", "gate", "run_recipe", "load_baseline"]


@dataclass(frozen=True)
class ModelOptions:
    """How to load the models named on the command line."""

    input_shape: tuple[int, ...] | None = None
    weights: str | None = None
    trust: bool = False
    exporter: Exporter = "dynamo"

    def load(self, spec: str) -> LoadedModel:
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
    return summarize(opts.load(spec))


def _speedup(first: Measurement, other: Measurement) -> RatioEstimate:
    """Speedup = first / other; from paired samples, so its interval inverts the latency-ratio interval."""
    r = paired_ratio(other.samples_ms, first.samples_ms)
    return RatioEstimate(r.ratio, r.low, r.high, r.confidence, r.n, r.method)


def bench(specs: list[str], target: Target, opts: ModelOptions, protocol: Protocol, use_cache: bool = True) -> list[BenchRow]:
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


def _accuracy(original: OnnxArtifact, final: OnnxArtifact, data) -> dict[str, Any] | None:
    """Top-1 of the exported ONNX files themselves (what ships), on the test split (val if none)."""
    if data is None:
        return None
    from squeeze.train import evaluate_onnx

    split, ds = ("test", data.test) if data.test is not None else ("val", data.val)
    before, after = evaluate_onnx(original, ds), evaluate_onnx(final, ds)
    return {"split": split, "n": after.n, "original_top1": before.top1, "final_top1": after.top1,
            "delta_pt": 100 * (after.top1 - before.top1)}


def run_recipe(recipe_ref: str | Recipe, model_spec: str, out_dir: Path, opts: ModelOptions, *,
               target_name: str | None = None, data_spec: str | None = None, use_cache: bool = True) -> dict[str, Any]:
    """Validate the recipe, load model and data, run the stages, compare with the original, write outputs.

    Writes model.onnx and report.json (and model.pt, a squeeze checkpoint, when a stage changed the
    architecture) to out_dir, all or nothing.
    """
    recipe = load_recipe(recipe_ref) if isinstance(recipe_ref, str) else recipe_ref
    target = load_target(target_name or recipe.target or "host-cpu")
    if recipe.budget and (recipe.budget.latency_ms is not None or recipe.budget.latency_ratio is not None):
        refuse_emulated_latency(target, "a latency budget")
    check_out_dir(out_dir)
    get_runtime_check(target)
    protocol = Protocol.for_target(target, **recipe.measure.model_dump())
    model = opts.load(model_spec)
    data = None
    if data_spec or recipe.data:
        from squeeze.data import load_data

        data = load_data(data_spec or recipe.data, input_shape=model.input_shape)
    ctx = PassContext(target, MeasuredOracle(target, protocol, use_cache), protocol, recipe.export, recipe.budget,
                      data=data, use_cache=use_cache)
    state = ModelState(model)
    original_artifact = export_onnx(model, exporter=recipe.export.exporter, atol=recipe.export.atol,
                                    rtol=recipe.export.rtol, use_cache=use_cache)
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
        "data": data.to_json() if data else None,
        # size_bytes: the torch model's fp32 weights; onnx_bytes: the file shipped (what quantization shrinks)
        "original": {**original.to_json(), "onnx_bytes": original_artifact.path.stat().st_size},
        "final": {**final.to_json(), "onnx_bytes": state.artifact.path.stat().st_size},
        "artifact": {**state.artifact.to_json(), "path": str(Path(out_dir) / "model.onnx")},
        "latency": _compare(original_artifact, state.artifact, target, protocol, use_cache),
        "accuracy": _accuracy(original_artifact, state.artifact, data),
        "measurements": {k: m.to_json() for k, m in state.measurements.items()},
        "stages": stages,
    }
    if original.macs and final.macs and original.macs != final.macs:  # pruning; quantization keeps the MACs
        report["macs_reduction"] = original.macs / final.macs
    files: dict[str, bytes | Path] = {"model.onnx": state.artifact.path, "report.json": json.dumps(report, indent=2).encode()}
    if state.model.plans:
        files["model.pt"] = checkpoint_bytes(state.model)
    report["written"] = [str(p) for p in write_outputs(out_dir, files)]
    return report
