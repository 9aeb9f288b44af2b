#!/usr/bin/env bash
# Set up, then run the test suite (fast tests; add `-m slow` or `-m device` for the opt-in ones).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup.sh
python -m pytest -q "$@"
