"""TVM (host-tvm, MetaSchedule-tuned) vs ONNX Runtime (host-cpu) on this CPU, in one run.

The model is tuned first (reported: layers, trials per layer, seconds; a second run reuses the database and
the compiled library). Then the two runtimes are measured back to back in rounds, alternating which goes
first: two runtimes cannot share one measurement worker (each configures process-wide thread pools), so a
round is one squeeze measurement (its own worker, the target's protocol) per runtime. The TVM/ORT ratio of
each round comes from measurements seconds apart; the figure is the median over rounds.

    python benchmarks/tvm_vs_ort.py --model zoo:resnet18 --trials 8 --rounds 5 [--untuned]
"""

from __future__ import annotations

import argparse
import statistics
import time

from squeeze.export.onnx import export_onnx
from squeeze.export.tvm import build_library
from squeeze.measure.bench import measure
from squeeze.measure.protocol import Protocol
from squeeze.model.loading import load_model
from squeeze.target import load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="zoo:resnet18")
    ap.add_argument("--trials", type=int, default=8, help="MetaSchedule trials per layer (host-tvm ships 32)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating ORT/TVM measurement rounds")
    ap.add_argument("--repeat", type=int, default=15, help="samples per measurement")
    ap.add_argument("--untuned", action="store_true", help="also measure TVM without tuning once")
    args = ap.parse_args()

    ort_target = load_target("host-cpu")
    base = load_target("host-tvm")
    tvm_target = base.model_copy(update={"tvm": base.tvm.model_copy(update={"tuning_trials": args.trials})})
    artifact = export_onnx(load_model(args.model))

    t0 = time.perf_counter()
    lib = build_library(artifact, tvm_target)
    tuning = lib.tuning
    print(f"{args.model}: {tuning['tasks']} layers to tune, {len(tuning['tuned_now'])} tuned now and "
          f"{tuning['reused']} reused from the database, {args.trials} trials per layer; tuning "
          f"{tuning['seconds']:.0f} s, tuning + compile {time.perf_counter() - t0:.0f} s", flush=True)

    protocols = {t.name: Protocol.for_target(t, repeat=args.repeat) for t in (ort_target, tvm_target)}
    medians: dict[str, list[float]] = {"host-cpu": [], "host-tvm": []}
    print("round, first, ORT median ms, TVM median ms, TVM/ORT", flush=True)
    for i in range(args.rounds):
        order = [ort_target, tvm_target] if i % 2 == 0 else [tvm_target, ort_target]
        for t in order:
            (m,) = measure([artifact], t, protocols[t.name], use_cache=False)
            medians[t.name].append(m.stats.median_ms)
            if t is tvm_target:
                assert not m.environment["untuned"], "host-tvm must measure tuned code"
        ort_ms, tvm_ms = medians["host-cpu"][-1], medians["host-tvm"][-1]
        print(f"{i + 1}, {order[0].name}, {ort_ms:.2f}, {tvm_ms:.2f}, {tvm_ms / ort_ms:.2f}", flush=True)
    ratios = [t / o for t, o in zip(medians["host-tvm"], medians["host-cpu"])]
    ort_ms, tvm_ms = (statistics.median(medians[n]) for n in ("host-cpu", "host-tvm"))
    print(f"TVM tuned ({args.trials} trials/layer) / ORT latency: median {statistics.median(ratios):.2f}x over "
          f"{args.rounds} rounds (min {min(ratios):.2f}, max {max(ratios):.2f}); ORT {ort_ms:.2f} ms, "
          f"TVM {tvm_ms:.2f} ms (medians of round medians); threads {protocols['host-cpu'].threads}")

    if args.untuned:
        untuned = base.model_copy(update={"tvm": base.tvm.model_copy(update={"tuning": "none", "tuning_trials": 0})})
        p = Protocol.for_target(untuned, repeat=3, warmup=1, min_repeat_ms=0)
        (m,) = measure([artifact], untuned, p, use_cache=False)
        (o,) = measure([artifact], ort_target, protocols["host-cpu"], use_cache=False)
        print(f"TVM untuned / ORT latency: {m.stats.median_ms / o.stats.median_ms:.1f}x "
              f"({m.stats.median_ms:.1f} ms vs {o.stats.median_ms:.2f} ms, back to back)")


if __name__ == "__main__":
    main()
