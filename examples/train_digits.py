"""Train the built-in digits CNN on scikit-learn's digits and save it as a squeeze checkpoint.

    python examples/train_digits.py --out out/digits-cnn.pt
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from squeeze.data import digits_splits
from squeeze.model.loading import ArchRef, LoadedModel, save_checkpoint
from squeeze.train import evaluate, train_classifier
from squeeze.model.zoo import get_entry
from squeeze.model.zoo.digits_cnn import digits_cnn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/digits-cnn.pt"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    data = digits_splits()
    torch.manual_seed(args.seed)
    model = digits_cnn()
    t0 = time.perf_counter()
    train_classifier(model, data.train, epochs=args.epochs, lr=3e-3, seed=args.seed)
    seconds = time.perf_counter() - t0
    val, test = evaluate(model, data.val), evaluate(model, data.test)
    print(f"trained {args.epochs} epochs in {seconds:.1f} s: val top-1 {100 * val.top1:.1f}%, "
          f"test top-1 {100 * test.top1:.1f}% ({test.n} images)")

    entry = get_entry("digits-cnn")
    loaded = LoadedModel("digits-cnn", "zoo", entry.input_shape, model.eval(), arch=ArchRef(entry.arch_ref),
                         metadata={"test_top1": test.top1, "data": "sklearn digits 16x16, 60/20/20 split"})
    save_checkpoint(args.out, loaded)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
