"""Latency-only pruning of the ImageNet-shaped zoo models to a measured latency budget on a target.

For each model: NetAdapt (no data: the proposal keeping the largest fraction of its group wins) and the
uniform baseline, both to the same budget. Prints the budget, the final latency measured interleaved with
the original, whether it lands within +-10% of the budget, ONNX parity, the MACs reduction, and the
measured speedup divided by the MACs reduction (1.0: latency falls as fast as MACs).

    python benchmarks/prune_zoo.py --models resnet18 mobilenet_v2 densenet121 --latency 0.5
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from squeeze import api
from squeeze.recipe import Budget, Recipe, Stage


def run(model: str, method: str, ratio: float, target: str, step: float) -> dict:
    options = {"latency_source": "table+recalibrate"}
    if method == "netadapt":
        options |= {"initial_reduction": step, "decay": 1.0}
    recipe = Recipe(name=f"{method}-{ratio}", target=target, budget=Budget(latency_ratio=ratio),
                    stages=[Stage(method=f"prune.{method}", options=options)])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        report = api.run_recipe(recipe, f"zoo:{model}", Path(out), api.ModelOptions())
    report["seconds"] = time.perf_counter() - t0
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "densenet121"])
    ap.add_argument("--methods", nargs="+", default=["netadapt", "uniform"])
    ap.add_argument("--latency", type=float, default=0.5, help="budget as a fraction of the original latency")
    ap.add_argument("--step", type=float, default=0.05, help="NetAdapt reduction per iteration (fraction of R0)")
    ap.add_argument("--target", default="host-cpu")
    args = ap.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("squeeze").setLevel(logging.INFO)  # search progress on stderr
    print("model, method, budget, measured ratio (95% CI), within +-10%, parity max abs err, MACs reduction, "
          "speedup / MACs reduction, seconds")
    for model in args.models:
        for method in args.methods:
            r = run(model, method, args.latency, args.target, args.step)
            sp = r["latency"]["speedup"]
            ratio, lo, hi = 1 / sp["ratio"], 1 / sp["high"], 1 / sp["low"]
            within = abs(ratio - args.latency) <= 0.1 * args.latency
            print(f"{model}, {method}, {args.latency:.2f}x, {ratio:.3f} [{lo:.3f}, {hi:.3f}], {'yes' if within else 'NO'}, "
                  f"{r['artifact']['parity']['max_abs_err']:.1e}, {r['macs_reduction']:.2f}x, "
                  f"{sp['ratio'] / r['macs_reduction']:.2f}, {r['seconds']:.0f}", flush=True)


if __name__ == "__main__":
    main()
