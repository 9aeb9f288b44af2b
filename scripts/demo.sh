#!/usr/bin/env bash
# The main job on the default target: train the digits CNN, then `squeeze info` and `squeeze bench` it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
python examples/train_digits.py --out out/digits-cnn.pt
squeeze info out/digits-cnn.pt
squeeze bench out/digits-cnn.pt --target host-cpu --json out/bench.json
