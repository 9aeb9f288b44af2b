"""Commands that only parse, list or validate start without importing torch, onnx or onnxruntime.

Each runs in a fresh interpreter (the test process has torch loaded already), through the real entry point.
"""

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "onnx", "onnxruntime")
COMMANDS = ["info", "bench", "prune", "quantize", "reparam", "report", "run", "validate", "list", "targets", "lut"]

# Runs the app with the given argv, then prints (last line of stderr) its exit code and which heavy modules loaded.
PROBE = f"""
import json, sys
from squeeze.cli.app import app
try:
    app()
    code = 0
except SystemExit as exc:
    code = exc.code or 0
print(json.dumps({{"code": code, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}), file=sys.stderr)
"""


def run_fresh(*args: str) -> tuple[dict, str]:
    argv = ["squeeze", *args]
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = {argv!r}\n{PROBE}"],
                       capture_output=True, text=True, timeout=120)
    return json.loads(r.stderr.strip().splitlines()[-1]), r.stdout


@pytest.mark.parametrize("args, expected", [
    (["--help"], "Hardware-aware model compression"),
    (["--version"], "squeeze "),
    *[([command, "--help"], "Usage: squeeze") for command in COMMANDS],
    (["targets", "show", "--help"], "Usage: squeeze targets show"),
    (["lut", "build", "--help"], "Usage: squeeze lut build"),
    (["list", "methods"], "prune.uniform"),
    (["list", "models"], "zoo:digits-cnn"),
    (["list", "targets"], "host-cpu"),
    (["list", "recipes"], "bench-host"),
    (["list", "runtimes"], "onnxruntime"),
    (["validate", "bench-host"], "ok: recipe `bench-host`"),
    (["targets", "list"], "host-cpu"),
    (["targets", "show", "host-cpu"], "host-cpu"),
])
def test_light_command_does_not_import_torch(args, expected):
    result, stdout = run_fresh(*args)
    assert result == {"code": 0, "heavy": []}
    assert expected in stdout
