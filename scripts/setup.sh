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
# The arm-a72 target cross-compiles with aarch64-linux-gnu-g++. As root on Debian/Ubuntu it is installed here;
# elsewhere the tests that need it skip, naming the package.
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing g++-aarch64-linux-gnu with apt (the arm-a72 target cross-compiles with it)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      g++-aarch64-linux-gnu; } >/tmp/squeeze-setup-apt.log 2>&1; then
      echo "setup: apt-get failed (see /tmp/squeeze-setup-apt.log); the cross-compiling tests will skip" >&2
    fi
  else
    echo "setup: aarch64-linux-gnu-g++ not found; the cross-compiling tests will skip" \
      "(install: sudo apt-get install g++-aarch64-linux-gnu)" >&2
  fi
fi
