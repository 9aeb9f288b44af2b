"""HAQ mixed precision on the digits CNN, measured on the target.

1. Latency budget, as `squeeze quantize zoo:digits-cnn --target host-cpu --method haq --latency 0.6x --data digits
   --out DIR` does it (through the same recipe path): the chosen precision per layer, its latency measured
   interleaved with fp32 and uniform int8 in one run, the test top-1 of all three through ONNX Runtime, and the
   search wall time. Where no policy can meet the budget on this machine, the tool's message is printed with
   its measured numbers.
2. Size budget (a fraction of the fp32 bytes), where convolutions may also take 2..7-bit weights (no kernel:
   simulated, exported on their bit grid in int8): HAQ against the uniform policy (the most bits that fit, the
   same in every middle layer), with the same final fine-tune. Here accuracy differs between policies, so the
   search has something to find.

    python benchmarks/haq_digits.py --latency 0.6 --size 0.08 --episodes 100
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
from squeeze.errors import SqueezeError
from squeeze.measure.protocol import Protocol
from squeeze.model.loading import load_model
from squeeze.methods.quant.haq import HAQOptions, finish, prepare, search
from squeeze.quant.haq import cost_of, names_of
from squeeze.recipe import Budget, Recipe, Stage
from squeeze.target import load_target


def show(title: str, rec: dict) -> None:
    lat, acc, b = rec["latency"], rec["accuracy"], rec["search_budget"]
    print(f"\n== {title}")
    for row in rec["rows"]:
        print(f"  {row['layer']:8s} {row['precision']:6s} w{row['weight_bits']}/a{row['act_bits']}  "
              f"{'measured' if row['measured'] else 'modelled'}  {row['exported_as']}  (choices: "
              f"{', '.join(row['choices'])})")
    print(f"  budget {b['resource']} <= {b['target']:.4g} ({b['target'] / b['original']:.3f}x fp32): "
          f"{'met' if b['met'] else 'NOT met'}")
    print(f"  latency measured interleaved: fp32 {lat['fp32_ms']:.4f} ms, uniform int8 {lat['uniform_int8_ms']:.4f} ms "
          f"({lat['uniform_int8_vs_fp32']:.3f}x), this policy {lat['haq_ms']:.4f} ms ({lat['haq_vs_fp32']:.3f}x)"
          + (f", predicted {lat['predicted_haq_ms']:.4f} ms" if lat["predicted_haq_ms"] else ""))
    print(f"  top-1 ({acc['split']}, ONNX Runtime): fp32 {100 * acc['fp32_top1']:.2f}%, uniform int8 PTQ "
          f"{100 * acc['uniform_int8_ptq_top1']:.2f}%, this policy {100 * acc['haq_top1']:.2f}%"
          + (f" (torch fake-quant {100 * acc['haq_torch_fake_quant_top1']:.2f}%)"
             if acc["haq_torch_fake_quant_top1"] is not None else ""))
    counted = rec["counted_size_bytes"]
    print(f"  counted size {counted['final']:,.0f} bytes (fp32 {counted['fp32']:,.0f}), ONNX file "
          f"{rec['size_bytes']['final']:,.0f} bytes; search {len(rec['episodes'])} episodes, "
          f"{rec['search_seconds']:.0f} s")


def latency_part(args, options: dict) -> None:
    recipe = Recipe(name="haq-latency", target=args.target, budget=Budget(latency_ratio=args.latency), data="digits",
                    stages=[Stage(method="quant.haq", options=options)])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = api.run_recipe(recipe, "zoo:digits-cnn", Path(tmp) / "out", api.ModelOptions())
        except SqueezeError as exc:
            print(f"\n== latency budget {args.latency}x: no policy meets it here.\n  {exc.message}")
            return
    show(f"HAQ, latency budget {args.latency}x of fp32 (total {time.perf_counter() - t0:.0f} s)",
         report["stages"][0]["record"])


def uniform_names(setup, bits: int) -> tuple[str, ...] | None:
    """The same weight bits (at most `bits`) in every layer that may go below 8, if that fits the budget."""
    policy = []
    for layer in setup.layers:
        fitting = [j for j, c in enumerate(layer.choices) if c.weight_bits <= bits and j >= layer.floor]
        policy.append(fitting[-1] if fitting else layer.floor)
    return names_of(setup.layers, policy) if cost_of(setup.layers, policy) <= setup.target_cost else None


def size_part(args, options: dict) -> None:
    model = load_model("zoo:digits-cnn")
    data = load_data("digits", input_shape=model.input_shape)
    target = load_target(args.target)
    fp32_bytes = sum(p.numel() * 4 for p in model.module.parameters()) + sum(
        b.numel() * 4 for b in model.module.buffers() if b.is_floating_point())
    budget = Budget(size_bytes=int(args.size * fp32_bytes))
    setup = prepare(model, data, target, Protocol.for_target(target), budget, HAQOptions(**options))
    names, records, seconds = search(setup)
    _, _, haq = finish(setup, names, records, seconds)
    show(f"HAQ, size budget {args.size}x of fp32 ({budget.size_bytes:,} bytes)", haq.to_json())
    bits = next((b for b in range(8, 1, -1) if uniform_names(setup, b)), None)
    if bits is None:
        print("  no uniform policy fits this budget")
        return
    _, _, uniform = finish(setup, uniform_names(setup, bits))
    show(f"uniform {bits}-bit weights in the middle layers, same budget and final fine-tune", uniform.to_json())
    delta = 100 * (haq.accuracy["haq_top1"] - uniform.accuracy["haq_top1"])
    print(f"\nsize budget {args.size}x: HAQ {100 * haq.accuracy['haq_top1']:.2f}% vs uniform {bits}-bit "
          f"{100 * uniform.accuracy['haq_top1']:.2f}% top-1 ({delta:+.2f} pt), counted "
          f"{haq.counted_size_bytes['final']:,.0f} vs {uniform.counted_size_bytes['final']:,.0f} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=0.6, help="latency budget, fraction of fp32 (0: skip)")
    ap.add_argument("--size", type=float, default=0.08, help="size budget, fraction of fp32 bytes (0: skip)")
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--short-term-iters", type=int, default=20)
    ap.add_argument("--target", default="host-cpu")
    # Training a net this small gains nothing from a second thread, and on a shared 2-core machine torch's
    # spinning threads made the search several times slower (the tests run with one thread too).
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("squeeze").setLevel(logging.INFO)  # search progress on stderr
    options = {"episodes": args.episodes, "warmup": args.warmup,
               "short_term": {"optimizer": "sgd", "lr": 0.001, "iterations": args.short_term_iters}}
    if args.latency:
        latency_part(args, options)
    if args.size:
        size_part(args, options)


if __name__ == "__main__":
    main()
