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
python -m pip install -q -e ".[dev,tvm,ray]"
# System packages some features need. As root on Debian/Ubuntu they are installed with apt here; elsewhere
# setup says what is skipped, and the tests that need them skip, naming the package.
# apt_install PACKAGE WHAT-IT-IS-FOR WHAT-SKIPS-WITHOUT-IT
apt_install() {
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing $1 with apt ($2)" >&2
    # another apt (a second setup, unattended upgrades) may hold the lock: wait for it rather than skip
    local wait="-o DPkg::Lock::Timeout=600"
    if ! { apt-get $wait update -qq && DEBIAN_FRONTEND=noninteractive apt-get $wait install -y -qq \
      --no-install-recommends "$1"; } >/tmp/squeeze-setup-apt.log 2>&1; then
      echo "setup: apt-get failed (see /tmp/squeeze-setup-apt.log); $3 will skip" >&2
    fi
  else
    echo "setup: $1 not installed; $3 will skip (install: sudo apt-get install $1)" >&2
  fi
}
if ! command -v aarch64-linux-gnu-g++ >/dev/null 2>&1; then
  apt_install g++-aarch64-linux-gnu "the arm-a72 target cross-compiles with it" "the cross-compiling tests"
fi
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  apt_install dataset-fashion-mnist "--data fashion-mnist and zoo:fashion-cnn read it" "the Fashion-MNIST tests"
fi
