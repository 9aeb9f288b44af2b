#!/usr/bin/env bash
# Set up (or refresh) .venv with squeeze and its test tools. Idempotent; sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# torch first, pinned: an unpinned torch (or a dependency asking for a newer one) pulls the CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev,tvm]"
