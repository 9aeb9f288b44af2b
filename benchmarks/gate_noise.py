"""How often does the CI gate cry wolf, and how often does it catch a real 10% slowdown?

Runs `squeeze bench NEW --against OLD` (through the same API) N times on two identical models (every
FAIL is a false alarm) and N times with NEW ~10% slower than OLD (one extra layer of ten; every FAIL is a
detection), then prints both rates with the time each gate run took. The slowdown actually present is
measured once, in a long interleaved run, and printed too.

    python benchmarks/gate_noise.py --runs 50 --max-regression 5%
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from squeeze.export.onnx import export_onnx
from squeeze.measure.bench import measure
from squeeze.measure.gate import GateConfig, run_gate
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import paired_ratio
from squeeze.model import LoadedModel
from squeeze.target import load_target


def conv_stack(layers: int, seed: int) -> nn.Module:
    """`layers` identical 3x3 conv+ReLU blocks at 64 channels, 28x28: cost grows ~linearly with depth."""
    torch.manual_seed(seed)
    blocks = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
    for _ in range(layers - 1):
        blocks += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def artifact(layers: int, seed: int):
    return export_onnx(LoadedModel(f"stack{layers}-s{seed}", "factory", (1, 3, 28, 28), conv_stack(layers, seed)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50, help="gate runs per scenario")
    ap.add_argument("--max-regression", default="5%")
    ap.add_argument("--target", default="host-cpu")
    args = ap.parse_args()
    threshold = float(args.max_regression.rstrip("%")) / (100 if args.max_regression.endswith("%") else 1)

    target = load_target(args.target)
    protocol = Protocol.for_target(target)
    cfg = GateConfig(max_regression=threshold)
    base, twin, slower = artifact(10, 0), artifact(10, 1), artifact(11, 0)

    # The slowdown actually present, from one long interleaved run.
    long = Protocol.for_target(target, repeat=100)
    m_base, m_slow = measure([base, slower], target, long, use_cache=False)
    truth = paired_ratio(m_base.samples_ms, m_slow.samples_ms)
    print(f"true slowdown of NEW (11 layers) over OLD (10 layers): {truth.ratio:.3f}x [{truth.low:.3f}, {truth.high:.3f}]")

    for label, new in (("identical models (false alarms)", twin), ("NEW ~10% slower (detections)", slower)):
        verdicts, seconds, ratios = [], [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            r = run_gate(new, base, target, protocol, cfg)
            seconds.append(time.perf_counter() - t0)
            verdicts.append(r.verdict)
            ratios.append(r.ratio.ratio)
        fails = verdicts.count("fail")
        print(f"{label}: FAIL {fails}/{args.runs} = {100 * fails / args.runs:.1f}%, "
              f"inconclusive {verdicts.count('inconclusive')}, "
              f"ratio median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}), "
              f"seconds per gate run median {statistics.median(seconds):.1f} (max {max(seconds):.1f})")


if __name__ == "__main__":
    main()
