"""MDP on a 3D CNN: `zoo:r3d-small` on fashion-motion clips, with temporal scales allowed vs channels only.

Each row is one MDP search at the same budget and fine-tune: the exported ONNX model's test top-1, the
latency ratio measured interleaved with the original (95% interval), the MACs reduction, ONNX parity, the
per-conv scales MDP kept below 1 (T, H, W as fractions) and the search time.

    python benchmarks/mdp_r3d.py --macs 0.5
    python benchmarks/mdp_r3d.py --latency 0.5
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

from squeeze import api

# setting -> (method, its options). r3d-small is narrow (16-64 channels): on the default grid of 8 channels
# no channel pruning reaches 0.5x MACs (every layer at its smallest width counts 0.739x), so the channels-only
# row is uniform pruning on a grid of 4.
SETTINGS = {
    "temporal+spatial": ("mdp", {"temporal_scales": [1.0, 0.5], "spatial_scales": [1.0, 0.5]}),
    "spatial only": ("mdp", {"temporal_scales": [1.0], "spatial_scales": [1.0, 0.5]}),
    "channels only (mdp)": ("mdp", {"temporal_scales": [1.0], "spatial_scales": [1.0]}),
    "channels only (uniform)": ("uniform", {"round_to": 4}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--macs", type=float)
    budget.add_argument("--latency", type=float)
    ap.add_argument("--settings", nargs="+", default=["temporal+spatial", "spatial only", "channels only (uniform)"],
                    choices=list(SETTINGS))
    ap.add_argument("--long-term-epochs", type=int, default=1)
    ap.add_argument("--target", default="host-cpu")
    args = ap.parse_args()
    if args.macs is None and args.latency is None:
        args.macs = 0.5
    logging.basicConfig(format="%(message)s")
    logging.getLogger("squeeze").setLevel(logging.INFO)
    print("setting, budget, test top-1 original -> pruned (ONNX), measured latency ratio (95% CI), MACs reduction, "
          "parity max abs err, scales below 1, search s")
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.settings):
            method, options = SETTINGS[name]
            options = options | {"long_term": {"optimizer": "sgd", "lr": 0.01, "epochs": args.long_term_epochs}}
            t0 = time.perf_counter()
            r = api.prune("zoo:r3d-small", Path(tmp) / f"setting{i}", method=method, macs=args.macs,
                          latency=args.latency, target=args.target, data="fashion-motion", options=options)
            acc, sp, record = r["accuracy"], r["latency"]["speedup"], r["stages"][0]["record"]
            scaled = {layer: s for layer, s in record.get("scales", {}).items() if min(s) < 1}
            budget = f"{args.macs}x MACs" if args.macs else f"{args.latency}x latency"
            print(f"{name}, {budget}, {100 * acc['original_top1']:.2f} -> {100 * acc['final_top1']:.2f}, "
                  f"{1 / sp['ratio']:.3f} [{1 / sp['high']:.3f}, {1 / sp['low']:.3f}], {r['macs_reduction']:.2f}x, "
                  f"{r['artifact']['parity']['max_abs_err']:.1e}, {scaled}, {record['search_seconds']:.0f} "
                  f"(total {time.perf_counter() - t0:.0f})", flush=True)


if __name__ == "__main__":
    main()
