"""AMC on a MobileNetV1 definition at half its MACs: the counts the paper's setting is checked against.

Prints the definition's MACs and weights at 224 (paper: 568.7M, 4.21M), the MACs of AMC's released 50%-FLOPs
channel list (293.9M), then runs a squeeze AMC search at 0.5x MACs and prints where it lands against the
budget (goal: within +-3%).

No ImageNet weights exist on this machine, so the network is randomly initialised and each policy rewarded by
AMC's `fidelity` reward on random images: minus the relative squared error of its (least-squares rebuilt)
logits against the unpruned network's. It grows with the capacity a policy keeps, so the agent learns to
spend the budget; it says nothing of an ImageNet accuracy.

    python benchmarks/amc_mobilenet.py --episodes 60
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from torch.utils.data import TensorDataset

from squeeze.data import DataBundle
from squeeze.methods.prune.amc import AMCOptions, amc
from squeeze.model.loading import load_model
from squeeze.model.summary import summarize
from squeeze.preprocessing import Preprocessing
from squeeze.prune.budget import Resource, resolve_budget
from squeeze.prune.graph import prunable_layers
from squeeze.prune.search import pruned_candidate
from squeeze.recipe import Budget

# AMC's released MobileNetV1 at 50% FLOPs: the input channels of each non-depthwise layer, stem to classifier.
AMC_CHANNELS = [3, 24, 48, 96, 80, 192, 200, 328, 352, 368, 360, 328, 400, 736, 752]


def self_labelled(model, n: int, seed: int = 0) -> DataBundle:
    """Random images labelled by the unpruned model's own top-1."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn((n, *model.input_shape[1:]), generator=g)
    with torch.no_grad():
        labels = torch.cat([model.module.eval()(b).argmax(1) for b in images.split(64)])
    split = TensorDataset(images, labels)
    return DataBundle("self-labelled random images", split, split, None, 1000, tuple(model.input_shape),
                      Preprocessing())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--images", type=int, default=128, help="random images the reward is measured on")
    ap.add_argument("--ratio", type=float, default=0.5, help="MACs budget as a fraction of the original")
    args = ap.parse_args()
    logging.basicConfig(format="%(message)s")
    logging.getLogger("squeeze").setLevel(logging.INFO)

    model = load_model("zoo:mobilenet_v1")
    s = summarize(model)
    weights = sum(m.weight.numel() for m in model.module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    print(f"MobileNetV1 at 224: {s.macs / 1e6:.2f}M MACs, {(weights + 1000) / 1e6:.3f}M conv/fc weights + fc bias")
    roots = prunable_layers(model.module, model.example_input()).names()
    released, _ = pruned_candidate(model, None, dict(zip(roots, AMC_CHANNELS[1:])), "l1", 8)
    print(f"AMC's released 50%-FLOPs channel list: {summarize(released).macs / 1e6:.2f}M MACs")

    resource = Resource("macs")
    budget = resolve_budget(Budget(macs_ratio=args.ratio), model, resource)
    opts = AMCOptions(episodes=args.episodes, warmup=max(1, args.episodes // 4), feature_images=32,
                      reward="fidelity", proxy={"eval_fraction": 1.0}, rescore_top=4,
                      long_term={"iterations": 1})
    t0 = time.perf_counter()
    result = amc(model, budget, resource, opts, self_labelled(model, args.images))
    macs = summarize(result.model).macs
    print(f"squeeze AMC at {args.ratio}x MACs ({args.episodes} episodes, {time.perf_counter() - t0:.0f} s): "
          f"{macs / 1e6:.2f}M MACs against a budget of {budget.target / 1e6:.2f}M "
          f"({100 * (macs / budget.target - 1):+.2f}%); ratios {result.extra['ratios']}")


if __name__ == "__main__":
    main()
