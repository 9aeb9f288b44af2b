"""The emulated arm64 board (scripts/arm64-emulator.sh): a real TVM rpc_tracker + rpc_server under qemu-user.

The board tests are opt-in (`pytest -m emulator`) and need root on Debian: the first start builds the arm64
userland (4-8 min) and caches it in SQUEEZE_ARM64_EMULATOR_CACHE (default ~/.cache/squeeze/arm64-emulator, not the
per-run test cache); later starts take under a minute. The script's refusals run in the default suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "arm64-emulator.sh"
START_TIMEOUT_S = 1200  # a cold start on a slow mirror
EM_AARCH64 = 183  # ELF e_machine


def _script(*args: str, env: dict | None = None, user: int | None = None, timeout: float = 120,
            script: Path = SCRIPT):
    cmd = ["bash", str(script), *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _why_no_board() -> str | None:
    if not (Path("/etc/debian_version").exists() and shutil.which("apt-get")):
        return "the emulated arm64 board needs a Debian/apt machine (debootstrap); this one is not"
    if os.geteuid() != 0:
        return "the emulated arm64 board needs root (apt, binfmt_misc, chroot): run `sudo .venv/bin/python -m pytest -m emulator`"
    return None


def _flat(text: str) -> str:
    """A rich table's text with borders removed and wrapped cells joined: 'a │ b\\n│ c' -> 'a b c'."""
    return " ".join(re.sub(r"[│┃┏┓┗┛┡┩└┘━─┳┻╇┼]", " ", text).split())


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """Starts the board in a work dir of its own (never touching one the user runs), with its exports set."""
    why = _why_no_board()
    if why:
        pytest.skip(why)
    pytest.importorskip("tvm", reason="the host side needs TVM: pip install 'squeeze[tvm]'")
    env = dict(os.environ)
    # conftest points SQUEEZE_CACHE_DIR at a fresh directory per run; the userland tarball belongs in the user's.
    env.setdefault("SQUEEZE_ARM64_EMULATOR_CACHE", str(Path.home() / ".cache" / "squeeze" / "arm64-emulator"))
    env["SQUEEZE_ARM64_EMULATOR_WORKDIR"] = str(tmp_path_factory.mktemp("arm64-emulator"))
    started = _script("start", env=env, timeout=START_TIMEOUT_S)
    if started.returncode != 0:
        _script("stop", env=env)
        pytest.fail(f"arm64-emulator.sh start exited {started.returncode}:\n{started.stderr[-4000:]}")
    exports = dict(line.removeprefix("export ").split("=", 1)
                   for line in started.stdout.splitlines() if line.startswith("export "))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in exports.items():
            mp.setenv(name, value)
        yield exports
    stopped = _script("stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert _script("status", env=env).returncode == 3


def _tiny_onnx():
    """Conv-ReLU, depthwise conv, global pooling, linear at 16x16 (224x224 takes ~13 s per call emulated)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    init = {"w1": rng.standard_normal((8, 3, 3, 3)), "b1": rng.standard_normal(8),
            "w2": rng.standard_normal((8, 1, 3, 3)), "fc": rng.standard_normal((4, 8)), "fb": rng.standard_normal(4)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], group=8),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in init.items()])
    # IR 8 / opset 17: what ONNX Runtime and TVM's importer both read
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.emulator
def test_raw_tvm_rpc_round_trip_matches_onnxruntime(board, tmp_path):
    import onnxruntime as ort
    import tvm
    from tvm import relax, rpc
    from tvm.relax.frontend.onnx import from_onnx

    model = _tiny_onnx()
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                                "mattr": ["+neon"]})
    executable = tvm.compile(from_onnx(model, shape_dict={"x": list(x.shape)}, dtype_dict="float32"), target)
    lib = tmp_path / "tiny-a72.so"
    executable.export_library(str(lib), fcompile=tvm.support.cc.cross_compiler("aarch64-linux-gnu-g++"))
    assert int.from_bytes(lib.read_bytes()[18:20], "little") == EM_AARCH64  # not loadable on this x86 host

    host, port = board["SQUEEZE_RPC_TRACKER"].rsplit(":", 1)
    assert host == "127.0.0.1" and board["SQUEEZE_RPC_KEY"] == "arm64-emulated" and board["SQUEEZE_RPC_EMULATED"] == "1"
    remote = rpc.connect_tracker(host, int(port)).request(board["SQUEEZE_RPC_KEY"], session_timeout=300)
    remote.upload(str(lib))
    dev = remote.cpu(0)
    vm = relax.VirtualMachine(remote.load_module(lib.name), dev)
    got = vm["main"](tvm.runtime.tensor(x, dev)).numpy()
    assert got.shape == expected.shape == (1, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.emulator
def test_targets_check_arm_a72_passes_on_the_emulated_board(board, cli):
    result = cli("targets", "check", "arm-a72")
    text = _flat(result.stdout)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "PASS: every applicable step works on `arm-a72`" in text
    assert f"tracker {board['SQUEEZE_RPC_TRACKER']}, key arm64-emulated" in text
    assert "aarch64 ELF (e_machine 183)" in text
    err = re.search(r"numerics vs ORT PASS max abs err ([0-9.e+-]+)", text)
    assert err and float(err.group(1)) < 1e-4, text
    # the latency figure is there, and labelled as an emulator's
    assert re.search(r"latency PASS median [0-9.]+ ms, .*labelled: .*emulated \(not ARM latency\)", text), text


@pytest.mark.emulator
def test_emulated_latency_is_refused_as_a_latency_gate(board, cli):
    result = cli("bench", "zoo:digits-cnn", "--against", "zoo:digits-cnn", "--target", "arm-a72",
                 "--max-regression", "5%")
    assert result.exit_code == 2
    assert "emulated board (qemu): its latency is not the device's latency" in _flat(result.stdout + result.stderr)


def test_script_refuses_a_user_who_is_not_root(tmp_path):
    if not shutil.which("setpriv") and os.geteuid() == 0:
        pytest.skip("needs setpriv (util-linux) to drop root")
    env = {**os.environ, "SQUEEZE_ARM64_EMULATOR_WORKDIR": str(tmp_path)}
    with tempfile.TemporaryDirectory() as readable:
        script = SCRIPT
        if os.geteuid() == 0:  # the checkout may sit in a folder only root can read (mktemp -d): copy it out
            Path(readable).chmod(0o755)
            script = Path(shutil.copy(SCRIPT, readable))
        r = _script("start", env=env, user=65534 if os.geteuid() == 0 else None, script=script)
    if not Path("/etc/debian_version").exists():
        assert r.returncode == 1 and "not Debian-based" in r.stderr
        return
    assert r.returncode == 1
    assert "must run as root" in r.stderr and "sudo" in r.stderr
    assert r.stdout == ""  # nothing an `eval` would run
    assert list(tmp_path.iterdir()) == []  # nothing was prepared


def test_script_usage_and_idle_stop_status(tmp_path):
    r = _script()
    assert r.returncode == 2 and "usage:" in r.stderr and "start|stop|status" in r.stderr
    if _why_no_board():
        pytest.skip(_why_no_board())
    env = {**os.environ, "SQUEEZE_ARM64_EMULATOR_WORKDIR": str(tmp_path / "work")}
    status = _script("status", env=env)
    assert status.returncode == 3 and "not running" in status.stderr and status.stdout == ""
    for _ in range(2):  # stopping a board that does not run is not an error
        stop = _script("stop", env=env)
        assert stop.returncode == 0, stop.stderr
