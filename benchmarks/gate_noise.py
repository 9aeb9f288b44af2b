"""How often does the CI gate cry wolf, and how often does it catch a real slowdown, quiet and loaded?

Runs the gate of `squeeze bench NEW --against OLD` (same protocol and decision) N times for each of three
pairs: two identical models (every FAIL is a false alarm), NEW ~10% slower (one extra layer of ten) and NEW
~2x slower (twenty layers instead of ten); every FAIL of the last two is a detection. With `--co-tenant`
each scenario runs again while a second process keeps one core busy (a busy loop bounded in time, killed at
the end), as on a shared CI runner. The slowdown actually present is measured once per pair, quiet, with the
gate's sampling over 300 rounds, and printed too. Seconds per gate run include starting its measurement worker.

    python benchmarks/gate_noise.py --runs 100 --co-tenant
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from squeeze.export.onnx import export_onnx
from squeeze.measure.bench import InterleavedRun
from squeeze.measure.gate import GateConfig, gate_protocol, run_gate
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import block_paired_ratio
from squeeze.model.loading import LoadedModel
from squeeze.target import load_target

_SPIN = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"


def conv_stack(layers: int, seed: int) -> nn.Module:
    """`layers` identical 3x3 conv+ReLU blocks at 64 channels, 28x28: cost grows ~linearly with depth."""
    torch.manual_seed(seed)
    blocks = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU()]
    for _ in range(layers - 1):
        blocks += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def artifact(layers: int, seed: int):
    return export_onnx(LoadedModel(f"stack{layers}-s{seed}", "factory", (1, 3, 28, 28), conv_stack(layers, seed)))


@contextlib.contextmanager
def co_tenant(active: bool, max_s: float):
    """A second process spinning on one core for at most `max_s` seconds; killed on exit."""
    proc = subprocess.Popen([sys.executable, "-c", _SPIN, str(max_s)]) if active else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def true_ratio(new, old, target, protocol: Protocol, cfg: GateConfig, rounds: int = 300):
    """The slowdown present: the gate's own sampling, for far more rounds than a gate run takes."""
    with InterleavedRun([old, new], target, gate_protocol(protocol), samples_per_round=cfg.samples_per_round,
                        shuffle=True) as run:
        for _ in range(rounds):
            run.round()
    return block_paired_ratio(*run.samples, 0.99)


def scenario(new, old, target, protocol: Protocol, cfg: GateConfig, runs: int) -> dict:
    verdicts, seconds, ratios = [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        r = run_gate(new, old, target, protocol, cfg)
        seconds.append(time.perf_counter() - t0)
        verdicts.append(r.verdict)
        ratios.append(r.ratio.ratio)
    return {"runs": runs, "fail": verdicts.count("fail"), "pass": verdicts.count("pass"),
            "inconclusive": verdicts.count("inconclusive"), "ratio_median": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "seconds_median": statistics.median(seconds),
            "seconds_max": max(seconds)}


def line(label: str, load: str, s: dict) -> str:
    return (f"{load:7s} {label:10s} FAIL {s['fail']:3d}/{s['runs']} = {100 * s['fail'] / s['runs']:5.1f}%  "
            f"pass {s['pass']:3d}  inconclusive {s['inconclusive']:3d}  ratio median {s['ratio_median']:.3f} "
            f"({s['ratio_min']:.3f}..{s['ratio_max']:.3f})  s/run median {s['seconds_median']:.1f} "
            f"(max {s['seconds_max']:.1f})  load avg {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=100, help="gate runs per scenario")
    ap.add_argument("--max-regression", default="5%")
    ap.add_argument("--target", default="host-cpu")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (the gate's default is 1)")
    ap.add_argument("--co-tenant", action="store_true", help="also run every scenario with one core kept busy")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    threshold = float(args.max_regression.rstrip("%")) / (100 if args.max_regression.endswith("%") else 1)

    target = load_target(args.target)
    protocol = Protocol.for_target(target, threads=args.threads)
    cfg = GateConfig(max_regression=threshold)
    base = artifact(10, 0)
    pairs = {"identical": artifact(10, 1), "10% slower": artifact(11, 0), "2x slower": artifact(20, 0)}

    for label, new in pairs.items():
        truth = true_ratio(new, base, target, protocol, cfg)
        print(f"true ratio, {label}: {truth.ratio:.3f}x [{truth.low:.3f}, {truth.high:.3f}]", flush=True)

    results = {}
    for load in ("quiet", "loaded") if args.co_tenant else ("quiet",):
        for label, new in pairs.items():
            with co_tenant(load == "loaded", args.runs * (cfg.max_time_s + 30)):
                results[f"{load} / {label}"] = s = scenario(new, base, target, protocol, cfg, args.runs)
            print(line(label, load, s), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"protocol": protocol.model_dump(), "gate": cfg.declared_protocol(), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
