"""int8 quantization on a target, measured: accuracy change, speedup, and auto-exclusion recovering a model
where naive int8 is slower.

1. digits CNN (trained): `squeeze quantize --data digits` -- the type choice, the accuracy of the fp32 and
   the int8 model through ONNX Runtime on the 360 test images, parity, measured speedup.
2. ResNet-18 (224x224, calibrated on the digits resized to 224; untrained weights, so speed and parity
   only): the same, types chosen by measurement.
3. A depthwise-heavy net (`depthwise_heavy` below) where every int8 type is slower than fp32: refused
   without --auto-exclude, then recovered with it. `--naive-int8-activations zoo:resnet18` adds the
   other naive case (int8 activations forced).
4. For each model, fp32 and every model produced above measured side by side in one interleaved run,
   with 95% intervals: the figures to quote.

    python benchmarks/quant_host.py [--samples 64] [--target host-cpu]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from squeeze import api
from squeeze.data import load_data
from squeeze.export.artifact import OnnxArtifact
from squeeze.export.onnx import export_onnx
from squeeze.measure.bench import measure
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import paired_ratio
from squeeze.quant.calibrate import calibration_data
from squeeze.quant.ptq import QuantConfig, layer_precisions, quantize_onnx
from squeeze.quant.run import NotFasterError
from squeeze.recipe import Recipe, Stage
from squeeze.target import load_target
from squeeze.model.zoo import get_entry


def depthwise_heavy(blocks: int = 40, channels: int = 64) -> nn.Module:
    """A depthwise-heavy net for the auto-exclusion demo: two dense 3x3 convs (where int8 wins), then
    `blocks` depthwise 3x3 conv-BN-ReLU layers (which ONNX Runtime's int8 kernels run slower than fp32
    here), at 56x56 for a 112x112 input. Untrained: for speed and parity only."""
    def cbr(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(c_out),
                             nn.ReLU())

    torch.manual_seed(0)
    c = channels
    return nn.Sequential(cbr(3, c, 2), cbr(c, c), cbr(c, c), *[cbr(c, c, groups=c) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)).eval()


def quantize(spec: str, opts: api.ModelOptions, target: str, samples: int, out: Path, **options) -> tuple[dict, float]:
    recipe = Recipe(name="quantize-int8", target=target, data="digits",
                    stages=[Stage(method="quant.int8", options={"samples": samples, **options})])
    t0 = time.perf_counter()
    report = api.run_recipe(recipe, spec, out, opts)
    return report, time.perf_counter() - t0


def _ratio(r: dict | None) -> str:
    return "—" if r is None else f"{r['ratio']:.3f}x [{r['low']:.3f}, {r['high']:.3f}]"


def show(label: str, report: dict, seconds: float, trained: bool) -> None:
    rec = report["stages"][0]["record"]
    acc = report["accuracy"]
    layers = rec["layers"]
    floats = [k for k, v in layers.items() if v == "fp32"]
    print(f"\n== {label} ({seconds:.0f} s)")
    for c in rec["type_choice"]["candidates"]:
        print(f"   types a:{c['activation_type']} w:{c['weight_type']}: {_ratio(c['speedup'])}")
    chosen = rec["type_choice"]["chosen"]
    print(f"   chosen a:{chosen['activation_type']} w:{chosen['weight_type']}; result: "
          f"{'fp32 FALLBACK' if rec['fallback'] else f'{len(layers) - len(floats)}/{len(layers)} layers int8'}"
          + (f" (float: {', '.join(floats)})" if floats and not rec["fallback"] else ""))
    for i, step in enumerate((rec.get("auto_exclude") or {}).get("steps", []), 1):
        print(f"   auto-exclude step {i}: {len(step['blamed_us'])} layer(s) to float -> {_ratio(step['speedup'])}")
    if trained:
        print(f"   top-1 ({acc['split']}, ORT): fp32 {100 * acc['original_top1']:.2f}%, final "
              f"{100 * acc['final_top1']:.2f}% ({acc['delta_pt']:+.2f} pt)")
    par = rec["output_parity"]
    print(f"   parity vs fp32: top-1 agreement {100 * par['top1_agreement']:.2f}%, SNR {par['snr_db']:.1f} dB; "
          f"file size {rec['size_bytes']['fp32']:,} -> {rec['size_bytes']['final']:,} B")
    for c in rec.get("confirmations", []):
        print(f"   second run, {c['config']}: {_ratio(c['speedup'])}")
    print(f"   speedup in the report's run: {_ratio(report['latency']['speedup'])}")


def side_by_side(fp32: OnnxArtifact, others: dict[str, OnnxArtifact], target: str) -> None:
    """fp32 and the others in one interleaved run."""
    tgt = load_target(target)
    ms = measure([fp32, *others.values()], tgt, Protocol.for_target(tgt, repeat=40), use_cache=False)
    env = ms[0].environment
    print(f"   one interleaved run, {ms[0].stats.n} samples each, {env['runtime']} {env['runtime_version']}, "
          f"{env['cpu']}, threads {ms[0].protocol['threads']}, load avg {env['load_avg_1m']}")
    print(f"   fp32: median {ms[0].stats.median_ms:.3f} ms")
    for (label, art), m in zip(others.items(), ms[1:]):
        r = paired_ratio(m.samples_ms, ms[0].samples_ms)  # fp32 / candidate
        int8 = sum(p != "fp32" for p in layer_precisions(art.path).values())
        print(f"   {label}: median {m.stats.median_ms:.3f} ms, speedup {r.ratio:.3f}x [{r.low:.3f}, {r.high:.3f}]"
              f" ({int8} layers int8)")


def _models(args) -> list[tuple[str, tuple[int, ...] | None, list[tuple[str, dict]]]]:
    """(model spec, input shape, [(label, int8 options)]) to run."""
    plain = [("int8 (types measured)", {})]
    depthwise = [("naive int8 (uint8/int8)", {}), ("int8 + auto-exclude", {"auto_exclude": True})]
    int8_act = [("naive int8 (int8 activations)", {"activation_type": "int8"}),
                ("int8 activations + auto-exclude", {"activation_type": "int8", "auto_exclude": True})]
    return ([(m, None, plain) for m in args.models] + [("quant_host:depthwise_heavy", (1, 3, 112, 112), depthwise)]
            + [(m, None, int8_act) for m in args.naive_int8_activations])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["zoo:digits-cnn", "zoo:resnet18"])
    ap.add_argument("--naive-int8-activations", nargs="*", default=[], help="models to quantize with int8 activations")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples")
    ap.add_argument("--target", default="host-cpu")
    args = ap.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("squeeze").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        for spec, shape, runs in _models(args):
            opts = api.ModelOptions(input_shape=shape)
            loaded = opts.load(spec)
            fp32 = export_onnx(loaded)
            trained = spec.startswith("zoo:") and get_entry(spec.removeprefix("zoo:")).trained
            made: dict[str, OnnxArtifact] = {}
            for label, options in runs:
                out = Path(tmp) / f"run-{len(made)}"
                try:
                    report, seconds = quantize(spec, opts, args.target, args.samples, out, **options)
                except NotFasterError as exc:  # naive int8 without auto-exclusion is refused, as it should be
                    print(f"\n== {spec}, {label}: refused: {exc.message}")
                    calib = calibration_data(load_data("digits", input_shape=loaded.input_shape), args.samples)
                    made[label] = quantize_onnx(fp32, calib, QuantConfig(**options))  # timed side by side below
                    continue
                show(f"{spec}, {label}", report, seconds, trained)
                a = report["artifact"]
                made[label] = OnnxArtifact(out / "model.onnx", a["sha256"], a["input_name"], tuple(a["input_shape"]),
                                           a["exporter"], None)
            print(f"\n== {spec}: side by side")
            side_by_side(fp32, made, args.target)


if __name__ == "__main__":
    main()
