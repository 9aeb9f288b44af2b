"""Uniform vs NetAdapt vs AMC on Fashion-MNIST at measured latency budgets, with the same fine-tune budget.

`zoo:fashion-cnn` (trained on first use) is pruned by each method to each budget of the original's latency
measured on the target; every row is the exported ONNX model's test top-1, the latency ratio measured
interleaved with the original (95% interval), the MACs reduction and the search wall time.

    python benchmarks/fashion_methods.py --latency 0.5 0.3 --methods uniform netadapt amc

`--macs 0.3` takes counted budgets instead: each search is then free of latency noise, so two runs that differ
in one option (e.g. `--netadapt-proxy`) differ by that option alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from squeeze import api
from squeeze.prune.budget import BudgetError


def method_options(method: str, args) -> dict:
    """The same long-term fine-tune for every method; each search's own knobs from the command line."""
    options = {"long_term": {"optimizer": "sgd", "lr": 0.01, "epochs": args.long_term_epochs}}
    if method == "netadapt":
        options |= {"initial_reduction": args.step, "decay": 1.0,
                    "short_term": {"optimizer": "sgd", "lr": 0.001, "iterations": args.short_term_iters}}
        if args.netadapt_proxy:
            options["proxy"] = json.loads(args.netadapt_proxy)
        if args.proposal_threads:
            options["proposal_threads"] = args.proposal_threads
    elif method == "amc":
        options |= {"episodes": args.episodes}
        if args.amc_proxy:
            options["proxy"] = json.loads(args.amc_proxy)
    return options


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budgets = ap.add_mutually_exclusive_group()
    budgets.add_argument("--latency", type=float, nargs="+", default=[0.5, 0.3],
                         help="budgets as fractions of the original's measured latency")
    budgets.add_argument("--macs", type=float, nargs="+", help="budgets as fractions of the original's MACs")
    ap.add_argument("--methods", nargs="+", default=["uniform", "netadapt", "amc"])
    ap.add_argument("--long-term-epochs", type=int, default=2)
    ap.add_argument("--short-term-iters", type=int, default=40)
    ap.add_argument("--step", type=float, default=0.08, help="NetAdapt reduction per iteration (fraction of R0)")
    ap.add_argument("--episodes", type=int, default=120, help="AMC episodes")
    ap.add_argument("--netadapt-proxy", help="NetAdapt's proposal evaluation as JSON, e.g. "
                                             '\'{"eval_fraction": 0.25}\' (see `squeeze proxy check`)')
    ap.add_argument("--proposal-threads", type=int,
                    help="torch threads per NetAdapt fine-tune: the same search with other rounding (its own noise)")
    ap.add_argument("--amc-proxy", help="AMC's reward evaluation as JSON (default: 20%% of the held-out split)")
    ap.add_argument("--target", default="host-cpu")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="images per measured inference (a server's batch makes the small CNN compute-bound)")
    ap.add_argument("--json", type=Path, help="also write every row here")
    args = ap.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("squeeze").setLevel(logging.INFO)  # search progress on stderr
    kind = "macs" if args.macs else "latency"
    rows = []
    print(f"budget ({kind}), method, "
          "test top-1 original -> pruned (ONNX), delta pt, measured latency ratio (95% CI), "
          "MACs reduction, search s, total s, machine (the original's time in the verdict's run / at its quietest)")
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.macs or args.latency:
            for method in args.methods:
                t0 = time.perf_counter()
                try:
                    r = api.prune("zoo:fashion-cnn", Path(tmp) / f"{method}-{ratio}", method=method, **{kind: ratio},
                                  target=args.target, data="fashion-mnist", options=method_options(method, args),
                                  measure={"batch_size": args.batch_size})
                except BudgetError as exc:  # a budget below the floor measured now: the row says so, and the rest run
                    rows.append({"budget": ratio, "budget_kind": kind, "method": method, "unreachable": str(exc)})
                    print(f"{ratio:.2f}x, {method}, unreachable: {exc}", flush=True)
                    continue
                acc, sp = r["accuracy"], r["latency"]["speedup"]
                record = r["stages"][0]["record"]
                row = {"budget": ratio, "budget_kind": kind, "method": method, "original_top1": acc["original_top1"],
                       "final_top1": acc["final_top1"], "delta_pt": acc["delta_pt"], "latency_ratio": 1 / sp["ratio"],
                       "latency_ratio_ci": [1 / sp["high"], 1 / sp["low"]], "macs_reduction": r["macs_reduction"],
                       "search_seconds": record["search_seconds"], "total_seconds": time.perf_counter() - t0,
                       "budget_met": record["budget_met"], "proxy": record.get("proxy"),
                       "contention": r["latency"].get("contention")}
                rows.append(row)
                print(f"{ratio:.2f}x, {method}, {100 * row['original_top1']:.2f} -> {100 * row['final_top1']:.2f}, "
                      f"{row['delta_pt']:+.2f}, {row['latency_ratio']:.3f} [{row['latency_ratio_ci'][0]:.3f}, "
                      f"{row['latency_ratio_ci'][1]:.3f}], {row['macs_reduction']:.2f}x, "
                      f"{row['search_seconds']:.0f}, {row['total_seconds']:.0f}, "
                      + (f"{row['contention']:.2f}x" if row["contention"] else "—"), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
