"""NetAdapt with its proposals fine-tuned on Ray against the serial run: wall time and the same result.

Runs `squeeze prune zoo:fashion-cnn --data fashion-mnist --macs 0.5x` (a counted budget: no latency reading
enters, so every run takes the same steps) serially (all threads), with `--workers 1` and `--workers N` (a local
Ray started for the run), and, with `--cluster`, through `--ray-address` on a two-node Ray cluster started here
(`ray start --head` plus a second node joining it, one CPU each; `ray stop` at the end). Each run is its own
process; the table gives its wall time, the search's own seconds, and whether plan, per-layer widths, every
proposal's accuracy and the final test accuracy equal the `--workers 1` run's (Ray tasks fine-tune with one
thread each; the serial run with all of them sums in another order, so its figures may differ in the last bits).

    python benchmarks/ray_netadapt.py --workers 2 --cluster

Needs the ray extra (pip install 'squeeze[ray]') and Fashion-MNIST (apt-get install dataset-fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HEAD_PORT = 6380
RAY = str(Path(sys.executable).with_name("ray"))


def prune(out: Path, args, *extra: str) -> dict:
    """One run of `squeeze prune` in its own process: its wall seconds and its report."""
    cmd = [sys.executable, "-m", "squeeze", "--quiet", "prune", args.model, "--data", args.data, "--macs", args.macs,
           "--short-term-iters", str(args.short_term_iters), "--long-term-epochs", str(args.long_term_epochs),
           "--option", f"initial_reduction={args.step}", "--out", str(out), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    return {"wall_s": seconds, "report": json.loads((out / "report.json").read_text())}


def outcome(run: dict) -> dict:
    """What must not depend on where the proposals ran."""
    rep = run["report"]
    rec = rep["stages"][0]["record"]
    return {"plan": rec["plan"], "widths": rec["widths"],
            "proposals": [[(p["layer"], p["width"], p["accuracy"]) for p in h["proposals"]] for h in rec["history"]],
            "winners": [(h["layer"], h["width_after"]) for h in rec["history"]],
            "final_top1": rep["accuracy"]["final_top1"]}


@contextmanager
def two_node_cluster():
    """A head node and a second node on this machine, one CPU each; stopped (both) at the end. A new cluster checks
    a token (~/.ray/auth_token), which the second node and the search send only with RAY_AUTH_MODE=token."""
    os.environ["RAY_AUTH_MODE"] = "token"
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1"}
    try:
        subprocess.run([RAY, "start", "--head", f"--port={HEAD_PORT}", "--num-cpus=1", "--include-dashboard=false",
                        "--object-store-memory=200000000"], check=True, env=env, stdout=subprocess.DEVNULL)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{HEAD_PORT}", "--num-cpus=1",
                        "--object-store-memory=200000000"], check=True, env=env, stdout=subprocess.DEVNULL)
        yield f"127.0.0.1:{HEAD_PORT}"
    finally:
        subprocess.run([RAY, "stop"], env=env, stdout=subprocess.DEVNULL)
        del os.environ["RAY_AUTH_MODE"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:fashion-cnn")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--macs", default="0.5x")
    ap.add_argument("--short-term-iters", type=int, default=20)
    ap.add_argument("--long-term-epochs", type=int, default=1)
    ap.add_argument("--step", type=float, default=0.1, help="NetAdapt reduction per iteration (fraction of R0)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cluster", action="store_true", help="also run on a two-node local Ray cluster")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs; {args.model} --data {args.data} --macs {args.macs}, short-term "
          f"{args.short_term_iters} steps, step {args.step}, {args.long_term_epochs} long-term epoch(s)")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["serial"] = prune(Path(tmp) / "serial", args)
        runs["--workers 1"] = prune(Path(tmp) / "workers1", args, "--workers", "1")
        runs[f"--workers {args.workers}"] = prune(Path(tmp) / "workers", args, "--workers", str(args.workers))
        if args.cluster:
            with two_node_cluster() as address:
                runs[f"--ray-address {address} (2 nodes x 1 CPU)"] = prune(Path(tmp) / "cluster", args,
                                                                           "--ray-address", address)
    base = outcome(runs["--workers 1"])
    print(f"{'run':44s} {'wall s':>7s} {'search s':>9s} {'iterations':>10s} {'final top-1':>11s}  evaluation; "
          "same plan / widths / proposal accuracies / final top-1 as --workers 1")
    for name, run in runs.items():
        rec, got = run["report"]["stages"][0]["record"], outcome(run)
        same = " / ".join("yes" if got[k] == base[k] else "NO" for k in ("plan", "widths", "proposals", "final_top1"))
        ev = rec.get("evaluation", {})
        print(f"{name:44s} {run['wall_s']:7.1f} {rec['search_seconds']:9.1f} {len(rec['history']):10d} "
              f"{100 * got['final_top1']:10.2f}%  {ev.get('runner')} x{ev.get('workers')}; {same}")
    one = runs["--workers 1"]["report"]["stages"][0]["record"]["search_seconds"]
    for name, run in ((n, r) for n, r in runs.items() if n != "--workers 1"):
        print(f"search speedup of {name} over --workers 1: "
              f"{one / run['report']['stages'][0]['record']['search_seconds']:.2f}x")


if __name__ == "__main__":
    main()
