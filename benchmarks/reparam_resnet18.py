"""Which ResNet-18 convs (at 224) squeeze replaces by Ghost or Lego modules on a target, and why.

Per candidate conv (all but the stem), the original and the replacement are timed standalone on the target
(lookup-table entries, each batch interleaved with the table's anchor layer), with MACs; the default choice
(at least 1.05x faster) is applied. Then the whole model with the chosen replacements against the original,
interleaved in one run, as squeeze decides (each layer replaced alone, then all the chosen ones). Weights are random (no ImageNet weights here): fp32 kernel times do not depend on them.

    python benchmarks/reparam_resnet18.py
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from squeeze.export.onnx import export_onnx
from squeeze.measure.oracle import interleaved
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import paired_ratio
from squeeze.methods.reparam.ghost import GhostOptions
from squeeze.model.loading import LoadedModel, load_model
from squeeze.reparam.modules import GhostSpec, LegoSpec, build_replacement
from squeeze.reparam.run import candidates, choose, folded, measure_in_model, measure_layers, replaced_module
from squeeze.target import load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="host-cpu")
    args = ap.parse_args()
    target = load_target(args.target)
    original = load_model("zoo:resnet18")
    x = original.example_input()
    for spec in (GhostSpec(2, 3), LegoSpec(2, 0.5)):
        found = candidates(original.module, x, spec, None)
        protocol = Protocol.for_target(target, repeat=30)
        rows = measure_layers(original.module, x, found, spec, target)
        in_model = measure_in_model(original, found, spec, target, protocol)
        for r in rows:
            r.in_model = in_model[r.name]
        choose(rows, GhostOptions(), None)
        names, skipped = found.names, found.skipped
        kinds = defaultdict(list)
        for name, r in zip(names, rows):  # grouped by conv shape: the layer types
            conv = original.module.get_submodule(name)
            kinds[(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0])].append(r)
        print(f"\n{spec.key} on {target.name} (not candidates: {skipped})")
        print("| conv (in, out, k, stride) | layer | standalone ms: original -> replacement | MACs ratio | "
              "whole model, this layer replaced [95%] | chosen |")
        print("|---|---|---|---|---|---|")
        for (c, n, k, s), group in kinds.items():
            for r in group:
                m = r.in_model
                print(f"| {c}->{n} {k}x{k} s{s} | {r.name} | {r.original_ms:.4f} -> {r.replacement_ms:.4f} "
                      f"({r.speedup:.2f}x) | {r.replacement_macs / r.original_macs:.3f} | {m['ratio']:.3f} "
                      f"[{m['low']:.3f}, {m['high']:.3f}] | {'yes' if r.chosen else 'no'} |")
        chosen = [r.name for r in rows if r.chosen]
        module = load_model("zoo:resnet18").module
        torch.manual_seed(0)
        replacements = {}
        for name in chosen:
            new = build_replacement(folded(module, name, found.absorbs.get(name)), spec)
            with torch.no_grad():
                for p in new.parameters():
                    p.normal_(0, 0.05)
            replacements[name] = new
        replaced = LoadedModel(f"resnet18-{spec.key}", "factory", original.input_shape,
                               replaced_module(module, replacements, found.absorbs).eval())
        artifacts = [export_onnx(m, exporter="torchscript") for m in (original, replaced)]
        a, b = interleaved(artifacts, target, Protocol.for_target(target, repeat=30))
        ratio = paired_ratio(a.samples_ms, b.samples_ms)  # replaced / original
        print(f"whole model with the {len(chosen)} chosen layers: latency ratio {ratio.ratio:.3f} "
              f"[{ratio.low:.3f}, {ratio.high:.3f}] (original {a.stats.median_ms:.2f} ms)")


if __name__ == "__main__":
    main()
