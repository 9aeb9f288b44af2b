"""Ghost and Lego re-parameterization of the trained Fashion-MNIST CNN: from the trained weights against from scratch.

For each method, every conv but the stem is replaced (`force`, so that every row has the same architecture):
- init only: the replacements fitted to the trained convs, no fine-tune;
- fine-tuned: the same, then the fine-tune budget with distillation from the original;
- from scratch: the same architecture (with its BatchNorms), every weight re-initialised, trained with the same
  budget (no teacher, learning rate 0.01);
and, for the default choice (a layer replaced only where measured faster), the fine-tuned result again.
Every row: test top-1 (the exported ONNX file's for squeeze's results; the torch model's for from scratch,
parity-checked exports give the same), the whole model's latency ratio to the original measured interleaved on
the target, and its MACs ratio.

    python benchmarks/reparam_fashion.py --epochs 1
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from squeeze import api


def run(method: str, fine_tune: dict | None, force: bool, target: str) -> dict | None:
    """The report, or None where no layer was measured faster (squeeze refuses and writes nothing)."""
    out = Path(tempfile.mkdtemp()) / "out"
    t0 = time.perf_counter()
    try:
        report = api.reparam("zoo:fashion-cnn", out, method=method, data="fashion-mnist", target=target,
                             options={"force": force, "fine_tune": fine_tune})
    except api.SqueezeError as exc:
        print(exc.message)
        return None
    report["seconds"] = time.perf_counter() - t0
    report["out"] = str(out)
    return report


def from_scratch(plan: dict, fine_tune: dict) -> float:
    """Test top-1 of the original architecture with the plan's convs replaced (their BatchNorms kept, as
    GhostNet and LegoNet train), every weight re-initialised, trained for the same budget without a teacher
    (at the learning rate of a training from scratch: `fine_tune` with lr 0.01)."""
    import torch

    from squeeze.data import load_data
    from squeeze.model.loading import load_model
    from squeeze.reparam.modules import LegoConv2d, build_replacement, spec_from_json
    from squeeze.reparam.plan import replace_layers
    from squeeze.train import evaluate, fine_tune as train
    from squeeze.train.config import FineTuneConfig

    model = load_model("zoo:fashion-cnn")
    torch.manual_seed(0)
    replace_layers(model.module, {
        name: build_replacement(model.module.get_submodule(name),
                                spec_from_json({k: v for k, v in entry.items() if k != "absorbs"}))
        for name, entry in plan["layers"].items()})
    for m in model.module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
    legos = [m for m in model.module.modules() if isinstance(m, LegoConv2d)]
    for m in legos:
        m.learn_selection()  # from the random selection reset_parameters drew
    data = load_data("fashion-mnist", input_shape=model.input_shape)
    train(model.module, data.train, FineTuneConfig(**{**fine_tune, "lr": 0.01}))
    for m in legos:
        m.freeze_selection()
    return evaluate(model.module.eval(), data.test).top1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["ghost", "lego"])
    ap.add_argument("--epochs", type=int, default=1, help="the fine-tune budget (and the from-scratch one)")
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--target", default="host-cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(format="%(message)s")
    budget = {"optimizer": "sgd", "lr": args.lr, "epochs": args.epochs, "grad_clip_norm": 10.0}
    rows = []

    def row(method: str, setting: str, report: dict | None, top1: float, seconds: float) -> None:
        r = {"method": method, "setting": setting, "test_top1": top1, "seconds": round(seconds, 1)}
        if report is not None:
            lat = report["latency"]["speedup"]
            r |= {"original_top1": report["accuracy"]["original_top1"],
                  "latency_ratio": [1 / lat["ratio"], 1 / lat["high"], 1 / lat["low"]],
                  "macs_ratio": report["final"]["macs"] / report["original"]["macs"],
                  "replaced": [x["name"] for x in report["stages"][0]["record"]["layers"] if x["chosen"]]}
        rows.append(r)
        print(json.dumps(r), flush=True)

    for method in args.methods:
        init = run(method, None, True, args.target)
        row(method, "init only (all layers)", init, init["accuracy"]["final_top1"], init["seconds"])
        tuned = run(method, budget, True, args.target)
        row(method, f"fine-tuned {args.epochs} ep (all layers)", tuned, tuned["accuracy"]["final_top1"],
            tuned["seconds"])
        t0 = time.perf_counter()
        scratch = from_scratch(tuned["stages"][0]["record"]["plan"], budget)
        row(method, f"from scratch {args.epochs} ep (same architecture)", None, scratch, time.perf_counter() - t0)
        chosen = run(method, budget, False, args.target)
        if chosen is None:
            rows.append({"method": method, "setting": "measured choice: no layer faster in the model, refused",
                         "test_top1": init["accuracy"]["original_top1"], "seconds": 0})
        else:
            row(method, f"fine-tuned {args.epochs} ep (measured choice)", chosen, chosen["accuracy"]["final_top1"],
                chosen["seconds"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print("\n| method | setting | test top-1 | latency ratio [95%] | MACs ratio | s |\n|---|---|---|---|---|---|")
    for r in rows:
        lat = "—" if "latency_ratio" not in r else "{:.3f} [{:.3f}, {:.3f}]".format(*r["latency_ratio"])
        macs = "—" if "macs_ratio" not in r else f"{r['macs_ratio']:.3f}"
        print(f"| {r['method']} | {r['setting']} | {100 * r['test_top1']:.2f}% | {lat} | {macs} | {r['seconds']} |")


if __name__ == "__main__":
    main()
