"""How wrong is the lookup table, with layers priced standalone and in context, on six nets at 224?

For each model, `squeeze lut check` twice on the same random plans: every layer timed alone (`--standalone`),
then priced in context from ONNX Runtime's profile of the whole model (the default). Each prints the median
and p90 absolute error of the table alone and after recalibrating on the first plans' measurements
(tables.FIT_ON; that median with its 95% bootstrap interval over the other plans). The nets:
the zoo's MobileNetV2, ResNet-18 and DenseNet-121 (random weights: latency does not depend on them), and
three of the tests' nets not used to develop the in-context entries (EfficientNet-B0-like with SE,
ShuffleNetV2-like with channel shuffle, RegNetX-400MF-like with groups). Run it on a quiet machine: whole-model
readings of a busy one move by more than the error being measured; each net's row counts the plans measured
while the machine ran over 1.2x slower than at its quietest in the check, in every try.

    python benchmarks/lut_incontext.py [--models zoo:mobilenet_v2 ...] [--plans 10] [--pricing in-context]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # testnets: the held-out-style nets

from squeeze.measure.lut import LatencyTable  # noqa: E402
from squeeze.model.loading import load_model  # noqa: E402
from squeeze.prune.tables import check_table  # noqa: E402
from squeeze.target import load_target  # noqa: E402

PRICING = {"standalone": False, "in-context": True}  # name -> check_table's in_context
MODELS = ("zoo:mobilenet_v2", "zoo:resnet18", "zoo:densenet121",
          "testnets:efficientnet_b0", "testnets:shufflenet_v2", "testnets:regnet_x_400mf")


def median_interval(errors: list[float], confidence: float = 0.95, draws: int = 2000) -> tuple[float, float]:
    """Bootstrap interval of the median error over the plans: whether a median is below a goal, or only
    happened to read so with this many plans."""
    boot = np.median(np.random.default_rng(0).choice(errors, (draws, len(errors))), axis=1)
    return tuple(np.percentile(boot, [50 * (1 - confidence), 50 * (1 + confidence)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--plans", type=int, default=10)
    ap.add_argument("--target", default="host-cpu")
    ap.add_argument("--pricing", nargs="+", choices=PRICING, default=list(PRICING),
                    help="which tables to check (one alone halves the time, for more plans)")
    args = ap.parse_args()

    target = load_target(args.target)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| model | " + " | ".join(f"{p}: median / p90 alone | recalibrated | contended plans" for p in args.pricing)
          + " | s |")
    print("|---|" + "---|---|---|" * len(args.pricing) + "---|")
    for spec in args.models:
        model = load_model(spec, input_shape=None if spec.startswith("zoo:") else (1, 3, 224, 224))
        t0 = time.perf_counter()
        cells = []
        for pricing in args.pricing:
            result = check_table(model, LatencyTable(target), args.plans, in_context=PRICING[pricing])
            (med, p90), (rmed, rp90) = result.summary(), result.summary(recalibrated=True)
            checked = [r for r in result.rows if r.recalibrated_ms is not None]
            low, high = median_interval([abs(r.recalibrated_error_pct) for r in checked])
            worst = max(result.contention(r) for r in result.rows)
            quiet = [abs(r.recalibrated_error_pct) for r in checked if r.plan not in result.contended_plans]
            refit = ("" if len(result.fitted_plans) == result.fit_on else
                     f" (fitted on {len(result.fitted_plans)} of {result.fit_on}: the others contended)")
            cells += [f"{med:.1f}% / {p90:.1f}%", f"{rmed:.1f}% [{low:.1f}, {high:.1f}] / {rp90:.1f}%{refit}",
                      f"{len(result.contended_plans)} of {len(result.rows)} (worst {worst:.2f}x); the others' "
                      f"recalibrated median {np.median(quiet) if quiet else float('nan'):.1f}%"]
        print(f"| {spec} | {' | '.join(cells)} | {time.perf_counter() - t0:.0f} |", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
