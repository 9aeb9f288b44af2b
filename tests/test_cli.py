"""The command line, end to end in-process: outputs, exit codes, and every bad input's message."""

import json
import os

import pytest
import torch

from conftest import file_digest


def test_version_and_help(cli):
    assert cli("--version").stdout.startswith("squeeze ")
    assert "bench" in cli("--help").stdout


def test_info_json_numbers(cli):
    r = cli("info", "zoo:digits-cnn", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["params"] == 135_674 and d["macs"] == 5_936_384 and d["input_shape"] == [1, 1, 16, 16]
    convs = [layer for layer in d["layers"] if layer["type"] == "Conv2d"]
    assert len(convs) == 5 and sum(layer["macs"] for layer in d["layers"]) == d["macs"]


def test_info_table(cli):
    r = cli("info", "zoo:resnet18")
    assert r.exit_code == 0 and "11.69M" in r.stdout and "1.81G" in r.stdout and "stem.0.0" in r.stdout


def test_bench_two_models_json(cli, tmp_path, fast):
    out = tmp_path / "bench.json"
    r = cli("bench", "zoo:digits-cnn", "zoo:mobilenet_v2", *fast, "--json", out)
    assert r.exit_code == 0, r.stderr
    assert "speedup" in r.stdout and "interleaved" in r.stdout
    d = json.loads(out.read_text())
    a, b = d["models"]
    assert a["speedup_vs_first"] is None and len(a["measurement"]["samples_ms"]) == 5
    assert a["measurement"]["run_id"] == b["measurement"]["run_id"]  # one interleaved run
    assert b["speedup_vs_first"]["ratio"] < 0.5  # MobileNetV2 at 224 is far slower than the 16x16 digits CNN
    assert a["artifact"]["parity"]["passed"]


def test_gate_cli_exit_codes(cli, tmp_path, fast):
    ok = cli("bench", "testnets:conv_stack", "--input-shape", "1,3,24,24", "--against", "testnets:conv_stack", *fast)
    assert ok.exit_code == 0 and "PASS" in ok.stdout
    res = tmp_path / "gate.json"
    # No --max-noise override: however loaded the machine, a clear regression exits 1.
    slow = cli("bench", "zoo:densenet121", "--against", "zoo:mobilenet_v2", *fast, "--max-regression", "10%",
               "--json", res)
    assert slow.exit_code == 1 and "FAIL" in slow.stdout and "straddles" not in slow.stdout
    d = json.loads(res.read_text())
    assert d["verdict"] == "fail" and d["ratio"]["low"] > 1.10 and d["max_regression"] == pytest.approx(0.10)
    assert d["gate_protocol"]["order"] == "random within each round" and d["new"]["protocol"]["threads"] == 1


def test_gate_baseline_file(cli, tmp_path, fast):
    base = tmp_path / "base.json"
    assert cli("bench", "zoo:mobilenet_v2", *fast, "--json", base).exit_code == 0
    r = cli("bench", "zoo:densenet121", "--baseline", base, *fast, "--max-noise", "1000%")
    assert r.exit_code == 1 and "baseline" in r.stdout


def test_run_recipe_writes_outputs(cli, tmp_path, fast):
    out = tmp_path / "out"
    r = cli("run", "bench-host", "zoo:digits-cnn", "--target", "host-cpu", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.html", "report.json"]
    rep = json.loads((out / "report.json").read_text())
    assert [s["method"] for s in rep["stages"]] == ["export.onnx", "measure.latency"]
    assert rep["measurements"]["latency"]["stats"]["median_ms"] > 0 and rep["artifact"]["parity"]["passed"]
    assert rep["original"]["params"] == rep["final"]["params"] == 135_674


def test_validate(cli, tmp_path):
    assert cli("validate", "bench-host").exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  - method: prune.magic\n")
    r = cli("validate", bad)
    assert r.exit_code == 2 and "unknown method `prune.magic`" in r.stderr


def test_lists_and_targets(cli):
    assert "export.onnx" in cli("list", "methods").stdout
    assert "zoo:resnet18" in cli("list", "models").stdout
    assert "bench-host" in cli("list", "recipes").stdout
    assert "onnxruntime" in cli("list", "runtimes").stdout
    assert "host-cpu" in cli("targets", "list").stdout
    shown = cli("targets", "show", "host-cpu")
    assert shown.exit_code == 0 and "runtime: onnxruntime" in shown.stdout


# --- bad inputs: one paragraph, non-zero exit, no traceback, input untouched, nothing half-written ----------

def assert_clean_error(r, *needles, code=2):
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_untrusted_pickle_refused_via_cli(cli, tmp_path, monkeypatch):
    import testnets

    path = tmp_path / "model.pt"
    torch.save(testnets.Booby(), path)
    canary = tmp_path / "canary"
    monkeypatch.setenv("SQUEEZE_TEST_CANARY", str(canary))
    before = file_digest(path)
    r = cli("info", path, "--input-shape", "1,4")
    assert_clean_error(r, "pickled Python object", "--trust-model")
    assert not canary.exists() and file_digest(path) == before
    assert cli("info", path, "--input-shape", "1,4", "--trust-model").exit_code == 0 and canary.exists()


def test_corrupt_model_file(cli, tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x00\x01 this is not a model")
    assert_clean_error(cli("info", path), "not a readable PyTorch file", "corrupt")
    assert path.read_bytes() == b"\x00\x01 this is not a model"


def test_wrong_input_shape(cli):
    assert_clean_error(cli("info", "zoo:digits-cnn", "--input-shape", "1,3,16,16"), "rejected an input of shape",
                       "--input-shape")
    assert_clean_error(cli("info", "zoo:digits-cnn", "--input-shape", "banana"), "is not a shape")


def test_unknown_target(cli):
    assert_clean_error(cli("bench", "zoo:digits-cnn", "--target", "arm-a99"), "Unknown target `arm-a99`",
                       "host-cpu", "cuda")


def test_lut_check_with_no_plan_left_after_the_ones_it_fits_on(cli):
    assert_clean_error(cli("lut", "check", "zoo:digits-cnn", "--plans", "3"),
                       "--fit-on 3 leaves none of the 3 plans", "--plans 13")


def test_unreachable_device(cli):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    assert_clean_error(cli("bench", "zoo:digits-cnn", "--target", "cuda"), "CUDAExecutionProvider", "onnxruntime-gpu")


def test_invalid_recipe_writes_nothing(cli, tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nstages:\n  - method: measure.latency\n    options: {lable: 1}\n")
    out = tmp_path / "out"
    assert_clean_error(cli("run", bad, "zoo:digits-cnn", "--out", out), "r.yaml:4", "stages.0.options.lable")
    assert not out.exists()


def test_failed_run_leaves_no_half_outputs(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("run", "bench-host", "testnets:noisy", "--input-shape", "1,3,4,4", "--out", out, "--no-cache")
    assert_clean_error(r, "differs from the torch model")
    assert not out.exists() or not any(out.iterdir())


def test_out_is_a_file(cli, tmp_path):
    f = tmp_path / "taken"
    f.write_text("mine")
    assert_clean_error(cli("run", "bench-host", "zoo:digits-cnn", "--out", f), "is an existing file")
    assert f.read_text() == "mine"


def test_gate_needs_exactly_one_new_model(cli):
    assert_clean_error(cli("bench", "zoo:digits-cnn", "zoo:resnet18", "--against", "zoo:digits-cnn"),
                       "exactly one NEW model")


def test_bad_baseline_file(cli, tmp_path):
    f = tmp_path / "b.json"
    f.write_text("{}")
    assert_clean_error(cli("bench", "zoo:digits-cnn", "--baseline", f), "not a result written by `squeeze bench --json`")


def test_debug_shows_traceback(cli):
    r = cli("--debug", "info", "zoo:nope")
    assert r.exit_code != 0 and r.exception is not None and "nope" in str(r.exception)


def test_python_dash_m_entry_point():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "squeeze", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("squeeze ")


def test_bench_an_onnx_file(cli, tmp_path, fast):
    from squeeze.export.onnx import export_onnx
    from squeeze.model.loading import load_model

    src = export_onnx(load_model("zoo:digits-cnn")).path
    path = tmp_path / "digits.onnx"
    path.write_bytes(src.read_bytes())
    r = cli("bench", path, "zoo:digits-cnn", *fast, "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.stderr
    d = json.loads((tmp_path / "b.json").read_text())
    # The same network as a file and from the zoo: one artifact, so latencies agree closely.
    assert d["models"][0]["artifact"]["exporter"] == "source" and d["models"][0]["macs"] is None
    assert 0.7 < d["models"][1]["speedup_vs_first"]["ratio"] < 1.4


def test_cached_latency_says_when_and_suggests_remeasuring_under_another_load(cli, fast, monkeypatch):
    from squeeze.report import render

    args = ("bench", "testnets:tiny_cnn", "--input-shape", "1,3,16,16", *fast)
    first = cli(*args)
    assert first.exit_code == 0 and "latency from the cache" not in first.stdout
    again = " ".join(cli(*args).stdout.split())
    assert "latency from the cache: measured 20" in again and "(--no-cache re-measures)" in again
    monkeypatch.setattr(render, "_load_now", lambda: 99.0)  # the machine is far busier now than then
    busy = " ".join(cli(*args).stdout.split())
    assert "the load is 99.00 now, so those milliseconds may not hold today: --no-cache re-measures" in busy


def test_a_corrupt_measurement_cache_is_set_aside_and_rebuilt(cli, tmp_path, monkeypatch, fast):
    import sqlite3

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    db = tmp_path / "cache" / "measurements.sqlite"
    db.parent.mkdir()
    junk = os.urandom(8192)
    db.write_bytes(junk)
    r = cli("bench", "testnets:tiny_cnn", "--input-shape", "1,3,16,16", *fast)
    assert r.exit_code == 0, r.stderr
    said = " ".join(r.stderr.split())
    assert "WARNING the measurement cache" in said and "was unreadable" in said and "started a new one" in said
    (aside,) = db.parent.glob("measurements.sqlite.corrupt-*")
    assert aside.read_bytes() == junk  # kept for inspection
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT count(*) FROM measurements").fetchone()[0] == 1


@pytest.mark.parametrize("command", [["info"], ["quantize", "--data", "digits", "--out", "OUT"]], ids=["info", "quantize"])
def test_non_finite_weights_are_named_at_load(cli, tmp_path, command):
    from squeeze.model.loading import load_model, save_checkpoint

    model = load_model("zoo:digits-cnn")
    with torch.no_grad():
        model.module.get_submodule("conv2.0").weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_checkpoint(path, model)
    out = tmp_path / "out"
    r = cli(command[0], path, *[str(out) if a == "OUT" else a for a in command[1:]])
    assert r.exit_code == 2 and "internal error" not in r.stderr
    said = " ".join(r.stderr.split())
    assert "has non-finite (NaN or infinite) weights in 1 tensor(s): conv2.0.weight (1 of" in said
    assert "re-export the weights from a good checkpoint" in said and not out.exists()


def test_an_empty_recipe_file_is_called_empty(cli, tmp_path):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("")
    for args in (["validate", recipe], ["run", recipe, "zoo:digits-cnn", "--out", tmp_path / "out"]):
        r = cli(*args)
        said = " ".join(r.stderr.split())
        assert r.exit_code == 2 and f"The recipe file {recipe} is empty." in said and "NoneType" not in said
    assert not (tmp_path / "out").exists()


def _onnx_file(path, node, initializers=()):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 7])
    graph = helper.make_graph([node], "g", [x], [y], initializer=list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.ops", 1)]),
              path)
    return path


@pytest.mark.parametrize("kind", ["custom-op", "bad-reshape"])
def test_a_model_that_fails_in_the_runtime_gets_one_paragraph(tmp_path, kind):
    """Through the installed command (the worker's own stderr included): no traceback, no ORT log line;
    --debug shows the worker's traceback."""
    import subprocess
    import sys

    from onnx import TensorProto, helper

    if kind == "custom-op":
        model = _onnx_file(tmp_path / "m.onnx", helper.make_node("Frobnicate", ["x"], ["y"], domain="my.ops"))
        needle = "my.ops:Frobnicate(-1) is not a registered function/op"
    else:
        shape = helper.make_tensor("shape", TensorProto.INT64, [2], [5, 7])
        model = _onnx_file(tmp_path / "m.onnx", helper.make_node("Reshape", ["x", "shape"], ["y"]), [shape])
        needle = "Reshape"
    cmd = [sys.executable, "-m", "squeeze", "bench", str(model), "--repeat", "3", "--no-cache"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    said = " ".join(r.stderr.split())
    assert r.returncode == 2 and "error: The measurement on `host-cpu` failed" in said and needle in said, said
    assert "Traceback" not in r.stderr and "[E:onnxruntime" not in r.stderr and "re-run with --debug" in said
    debug = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "squeeze/measure/worker.py" in debug.stderr


# Flags of other programs that squeeze's messages quote (TVM's rpc_server, nvcc, ray start|status).
FOREIGN_FLAGS = {"--host", "--port", "--custom-addr", "--cubin", "--help", "--head", "--address"}


def _cli_options() -> set[str]:
    import typer

    from squeeze.cli.app import app

    found: set[str] = set()

    def walk(command):
        for param in command.params:
            found.update(getattr(param, "opts", []), getattr(param, "secondary_opts", []))
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return found


def test_every_option_a_message_names_exists():
    """A hint that names a flag the CLI does not have sends the user nowhere: every `--flag` in squeeze's own
    strings is an option of some command."""
    import ast
    import re
    from pathlib import Path

    import squeeze

    named: dict[str, str] = {}
    for path in Path(squeeze.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", node.value):
                    named.setdefault(flag, str(path))
    assert len(named) > 40
    missing = {flag: where for flag, where in named.items() if flag not in _cli_options() | FOREIGN_FLAGS}
    assert missing == {}


def test_a_factory_in_the_current_folder_imports_without_pythonpath(cli, tmp_path, monkeypatch):
    (tmp_path / "mynets_cwd.py").write_text(
        "from torch import nn\n"
        "def small():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))\n")
    monkeypatch.chdir(tmp_path)
    r = cli("info", "mynets_cwd:small", "--input-shape", "1,3,16,16")
    assert r.exit_code == 0, r.stderr
    assert "Conv2d" in r.stdout and "small" in r.stdout


def test_each_model_carries_its_own_weights(cli, tmp_path, fast):
    """An original (factory + its weights) and a second copy with other weights, benched together."""
    import testnets
    from squeeze.model.loading import load_model

    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    state = testnets.tiny_cnn().state_dict()
    torch.save(state, a)
    torch.save({k: 2 * v for k, v in state.items()}, b)
    assert torch.equal(load_model("testnets:tiny_cnn@" + str(a), input_shape=(1, 3, 16, 16)).module[0].weight,
                       torch.load(a)["0.weight"])
    out = tmp_path / "b.json"
    r = cli("bench", f"testnets:tiny_cnn@{a}", f"testnets:tiny_cnn@{b}", "--input-shape", "1,3,16,16", *fast,
            "--json", out)
    assert r.exit_code == 0, r.stderr
    shas = [m["artifact"]["sha256"] for m in json.loads(out.read_text())["models"]]
    assert shas[0] != shas[1]  # two different weight files, two different exports
    r = cli("info", f"testnets:tiny_cnn@{a}", "--weights", str(b), "--input-shape", "1,3,16,16")
    assert_clean_error(r, "names its weights and --weights", "Give the weights one way")


def test_progress_bars_are_drawn_on_a_terminal_only_and_vanish_when_done():
    import io

    from rich.console import Console

    from squeeze import progress
    from squeeze.cli.progress import RichReporter, reporter_for

    buf = io.StringIO()
    reporter = RichReporter(Console(file=buf, force_terminal=True, width=100))
    with progress.reporting(reporter):
        with progress.task("fine-tune", total=4, unit="steps") as step:
            with progress.task("layers") as inner:  # nested, of unknown length
                inner.describe("conv1")
            step.advance(1, loss="0.1234")
            reporter.progress.refresh()
            drawn = buf.getvalue()
    assert "fine-tune" in drawn and "1/4" in drawn and "steps loss 0.1234" in drawn
    assert not reporter.progress.live.is_started and not reporter.progress.tasks  # transient: gone with the last
    assert isinstance(reporter_for(Console(file=io.StringIO(), force_terminal=True)), RichReporter)
    assert reporter_for(Console(file=io.StringIO(), force_terminal=True), quiet=True) is None


def test_progress_off_a_terminal_is_plain_lines_throttled_and_quiet_hides_it(cli, monkeypatch, tmp_path):
    """A log or CI gets a line per step started and ended, and at most one per `every` seconds in between."""
    import io

    from rich.console import Console

    from squeeze import progress
    from squeeze.cli import progress as cli_progress

    buf = io.StringIO()
    reporter = cli_progress.reporter_for(Console(file=buf, width=200))
    assert isinstance(reporter, cli_progress.PlainReporter)
    clock = iter([0.0, 0.0, 1.0, 20.0, 20.0, 20.0, 21.0, 30.0, 30.0])  # each monotonic() call, in order
    monkeypatch.setattr(cli_progress.time, "monotonic", lambda: next(clock))
    with progress.reporting(reporter), progress.task("NetAdapt to 0.05 latency_ms", total=100, unit="%") as bar:
        bar.advance(10, best="conv1 -> 24")  # 1 s: too soon for a line
        bar.advance(10, best="conv2 -> 16")  # 20 s: a line
        bar.advance(80, best="conv3 -> 8")  # 21 s: too soon again
    assert buf.getvalue().splitlines() == [
        "NetAdapt to 0.05 latency_ms: 0/100 %",
        "NetAdapt to 0.05 latency_ms: 20/100 % best conv2 -> 16 (20 s)",
        "NetAdapt to 0.05 latency_ms: done, 100/100 % in 30.0 s (best conv3 -> 8)",
    ]
    monkeypatch.undo()
    # The CLI (a pipe in the test runner) shows the lookup table being measured in lines; --quiet shows nothing.
    args = ["lut", "build", "testnets:tiny_cnn", "--input-shape", "1,3,16,16", "--round-to", "4"]
    for quiet, cache in ((False, "a"), (True, "b")):
        monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / cache))
        r = cli(*(["--quiet"] if quiet else []), *args)
        assert r.exit_code == 0, r.output
        lines = [line for line in r.stderr.splitlines() if line.startswith("lookup table: measuring")]
        assert (lines == []) if quiet else (len(lines) >= 2 and "done" in lines[-1])
        assert not quiet or r.stderr == ""
