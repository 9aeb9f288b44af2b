"""NetAdapt vs uniform pruning on real data (scikit-learn digits) at measured latency budgets.

A digits CNN large enough for compute to dominate latency (32x32 input, width 2) is trained once, then
pruned by NetAdapt and by the uniform baseline to each budget with the same fine-tune budget; the report
gives the test accuracy of each exported ONNX model, the latency measured interleaved with the original,
and the search wall time.

    python benchmarks/prune_digits.py --latency 0.5 0.3
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from squeeze import api
from squeeze.data import load_data
from squeeze.model.loading import ArchRef, LoadedModel, save_checkpoint
from squeeze.model.zoo.digits_cnn import digits_cnn
from squeeze.recipe import Budget, Recipe, Stage
from squeeze.train import FineTuneConfig, evaluate, fine_tune

SHAPE = (1, 1, 32, 32)


def trained_model(folder: Path) -> Path:
    data = load_data("digits", input_shape=SHAPE)
    torch.manual_seed(0)
    model = digits_cnn(width=2.0)
    fine_tune(model, data.train, FineTuneConfig(optimizer="adamw", lr=3e-3, epochs=10), progress=False)
    print(f"trained digits-cnn width 2 at 32x32: test top-1 {100 * evaluate(model, data.test).top1:.2f}%")
    path = folder / "digits-w2.pt"
    save_checkpoint(path, LoadedModel("digits-w2", "factory", SHAPE, model.eval(),
                                      arch=ArchRef("squeeze.model.zoo.digits_cnn:digits_cnn", {"width": 2.0})))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, nargs="+", default=[0.5, 0.3])
    ap.add_argument("--long-term-epochs", type=int, default=5)
    ap.add_argument("--short-term-iters", type=int, default=50)
    ap.add_argument("--step", type=float, default=0.06, help="NetAdapt reduction per iteration (fraction of R0)")
    ap.add_argument("--target", default="host-cpu")
    args = ap.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("squeeze").setLevel(logging.INFO)  # search progress on stderr
    long_term = {"optimizer": "sgd", "lr": 0.01, "epochs": args.long_term_epochs}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(trained_model(Path(tmp)))
        print("budget, method, test top-1 original -> pruned (ONNX), delta pt, measured latency ratio (95% CI), "
              "MACs reduction, search seconds")
        for ratio in args.latency:
            for method in ("netadapt", "uniform"):
                options = {"long_term": long_term}
                if method == "netadapt":
                    options |= {"initial_reduction": args.step, "decay": 1.0,
                                "short_term": {"optimizer": "sgd", "lr": 0.001, "iterations": args.short_term_iters}}
                recipe = Recipe(name=method, target=args.target, budget=Budget(latency_ratio=ratio), data="digits",
                                stages=[Stage(method=f"prune.{method}", options=options)])
                t0 = time.perf_counter()
                r = api.run_recipe(recipe, model, Path(tmp) / f"{method}-{ratio}", api.ModelOptions())
                acc, sp = r["accuracy"], r["latency"]["speedup"]
                search_s = r["stages"][0]["record"]["search_seconds"]
                print(f"{ratio:.2f}x, {method}, {100 * acc['original_top1']:.2f} -> {100 * acc['final_top1']:.2f}, "
                      f"{acc['delta_pt']:+.2f}, {1 / sp['ratio']:.3f} [{1 / sp['high']:.3f}, {1 / sp['low']:.3f}], "
                      f"{r['macs_reduction']:.2f}x, {search_s:.0f} (total {time.perf_counter() - t0:.0f})", flush=True)


if __name__ == "__main__":
    main()
