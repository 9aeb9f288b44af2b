"""The `tvm` runtime: target schema, the install hint, compiling (and cross-compiling), local runs with parity
and labels, compile-only CUDA, emulated boards refused as budgets, tuning-database reuse, `targets check`."""

import json
import sys

import pytest
from conftest import needs_cross_compiler

from squeeze.errors import RuntimeUnavailableError, TargetError
from squeeze.target import load_target

tvm = pytest.importorskip("tvm", reason="the tvm extra is not installed (pip install 'squeeze[tvm]')")

from squeeze.export import tvm as tx  # noqa: E402
from squeeze.measure.protocol import Protocol  # noqa: E402


def write_target(tmp_path, name: str, body: str):
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\nruntime: tvm\n{body}")
    return p


@pytest.fixture
def untuned(tmp_path):
    """This CPU through TVM without tuning (fast to build; labelled untuned)."""
    return load_target(str(write_target(tmp_path, "cpu-untuned", "tvm: {target: detect, tuning: none}\n")))


@pytest.fixture(scope="module")
def tiny():
    import testnets
    from squeeze.export.onnx import export_onnx
    from squeeze.model.loading import LoadedModel

    return export_onnx(LoadedModel("tiny", "factory", (1, 3, 16, 16), testnets.tiny_cnn()), exporter="torchscript")


# --- schema -----------------------------------------------------------------------------------------------


def test_shipped_tvm_targets():
    host, arm, cuda = (load_target(n) for n in ("host-tvm", "arm-a72", "cuda-tvm"))
    assert host.tvm.target == "detect" and host.tvm.runner == "local" and host.tvm.tuning == "metaschedule"
    assert host.tvm.tuning_trials > 0
    assert arm.tvm.runner == "rpc" and arm.tvm.cross_compiler == "aarch64-linux-gnu-g++" and arm.threads == 4
    assert arm.tvm.target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"],
                              "num-cores": 4}
    assert arm.tvm.rpc.key == "rpi4" and arm.tvm.rpc.address is None  # the board comes from flags/env
    assert cuda.device == "cuda" and cuda.tvm.compile_only_target == "nvidia/nvidia-a100"


@pytest.mark.parametrize("tvm_section, message", [
    ("{target: 'llvm -mcpu=cortex-a72'}", "CLI-style target string"),
    ("{target: detect, host: '-mtriple=x'}", "CLI-style target string"),
    ("{target: detect, runner: ssh}", "`tvm.runner`: Input should be 'local', 'rpc' or 'compile-only'"),
    ("{target: detect, tuning: autotvm}", "`tvm.tuning`: Input should be 'none' or 'metaschedule'"),
    ("{target: detect, tuning: metaschedule}", "needs `tuning_trials` >= 1"),
    ("{target: detect, tuning_trials: 8}", "`tuning_trials` is set but `tuning` is none"),
    ("{target: detect, tuning: metaschedule, tuning_trials: -1}", "greater than or equal to 0"),
    ("{target: detect, rpc: {host: pi}}", "`host` and `port` go together"),
    ("{target: detect, rpc: {host: pi, port: 70000}}", "less than or equal to 65535"),
    ("{target: detect, rpc: {tracker: 'pi'}}", "tracker `pi` is not HOST:PORT"),
    ("{target: detect, rpc: {tracker: 'pi:9190'}}", "a tracker needs the `key`"),
    ("{target: detect, rpc: {host: pi, port: 9090, tracker: 'pi:9190', key: k}}", "not both"),
    ("{target: detect, rpc: {host: pi, port: 9090, session_timeout_s: 0}}", "greater than 0"),
    ("{target: detect, rpc: {host: pi, port: 9090, connect_timeout_s: -1}}", "greater than 0"),
    ("{target: detect, rpc: {host: pi, port: 9090, retries: -1}}", "greater than or equal to 0"),
    ("{target: detect, rpc: {host: pi, port: 9090, emulated: perhaps}}", "valid boolean"),
    ("{target: detect, cross_compiler: [g++]}", "`tvm.cross_compiler`: Input should be a valid string"),
    ("{target: detect, colour: red}", "Extra inputs are not permitted"),
])
def test_each_tvm_field_is_validated(tmp_path, tvm_section, message):
    p = write_target(tmp_path, "bad", f"tvm: {tvm_section}\n")
    with pytest.raises(TargetError, match="bad.yaml:3") as info:
        load_target(str(p))
    assert message in info.value.message


def test_valid_tvm_fields_load(tmp_path):
    p = write_target(tmp_path, "full", "device: arm\ntvm:\n  target: raspberry-pi/4b-aarch64\n"
                     "  host: {kind: llvm, mtriple: aarch64-linux-gnu}\n"
                     "  compile_only_target: raspberry-pi/4b-aarch64\n  runner: rpc\n"
                     "  cross_compiler: aarch64-linux-gnu-g++\n  tuning: metaschedule\n  tuning_trials: 16\n"
                     "  rpc: {tracker: '10.0.0.2:9190', key: rpi4, session_timeout_s: 60, connect_timeout_s: 3, "
                     "retries: 1, emulated: true}\n")
    t = load_target(str(p))
    assert t.tvm.rpc.address == "tracker 10.0.0.2:9190, key rpi4" and t.emulated and t.tvm.tuning_trials == 16


def test_unknown_tvm_target_names_the_value(untuned, tmp_path):
    t = load_target(str(write_target(tmp_path, "odd", "tvm: {target: nvidia/no-such-gpu}\n")))
    with pytest.raises(TargetError, match=r"TVM does not accept the target \"nvidia/no-such-gpu\".*list_tags"):
        tx.resolve_target(t)


# --- where the board is: file < environment < flags ----------------------------------------------------------


def test_board_from_file_env_and_flags(tmp_path, monkeypatch):
    from squeeze.cli.common import rpc_flags

    for k in ("SQUEEZE_RPC_HOST", "SQUEEZE_RPC_PORT", "SQUEEZE_RPC_TRACKER", "SQUEEZE_RPC_KEY", "SQUEEZE_RPC_EMULATED"):
        monkeypatch.delenv(k, raising=False)
    p = str(write_target(tmp_path, "board", "tvm: {target: detect, runner: rpc, rpc: {host: file-host, port: 1}}\n"))
    assert load_target(p).tvm.rpc.address == "file-host:1"
    monkeypatch.setenv("SQUEEZE_RPC_TRACKER", "env-tracker:9190")
    monkeypatch.setenv("SQUEEZE_RPC_KEY", "env-key")
    monkeypatch.setenv("SQUEEZE_RPC_EMULATED", "1")
    t = load_target(p)
    assert t.tvm.rpc.address == "tracker env-tracker:9190, key env-key" and t.emulated
    with rpc_flags(p, "flag-host:9091", None, None):
        assert load_target(p).tvm.rpc.address == "flag-host:9091"  # the flag's way replaces the tracker
    with rpc_flags(p, None, "flag-tracker:9190", "flag-key"):
        assert load_target(p).tvm.rpc.address == "tracker flag-tracker:9190, key flag-key"
    assert load_target(p).tvm.rpc.address == "tracker env-tracker:9190, key env-key"  # flags last one command
    assert load_target("host-tvm").tvm.rpc is None  # the environment only touches RPC targets


def test_bad_board_flags(cli, fast):
    r = cli("bench", "zoo:digits-cnn", "--target", "arm-a72", "--rpc", "pi", *fast)
    assert r.exit_code == 2 and "--rpc `pi` is not HOST:PORT" in r.stderr
    r = cli("bench", "zoo:digits-cnn", "--target", "arm-a72", "--rpc", "pi:1", "--tracker", "pi:2", *fast)
    assert r.exit_code == 2 and "give one" in r.stderr
    r = cli("bench", "zoo:digits-cnn", "--target", "host-cpu", "--rpc", "pi:1", *fast)
    assert r.exit_code == 2 and "`host-cpu` does not" in r.stderr


def test_missing_board_says_how_to_start_one(cli, monkeypatch, fast):
    for k in ("SQUEEZE_RPC_HOST", "SQUEEZE_RPC_PORT", "SQUEEZE_RPC_TRACKER"):
        monkeypatch.delenv(k, raising=False)
    r = cli("bench", "testnets:tiny_cnn", "--input-shape", "1,3,16,16", "--target", "arm-a72", *fast)
    assert r.exit_code == 2
    msg = " ".join(r.stderr.split())
    assert "no board is configured" in msg and "python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090" in msg
    assert "python -m tvm.exec.rpc_tracker" in msg and "SQUEEZE_RPC_HOST" in msg and "--tracker" in msg


# --- TVM not installed, or with the wrong ffi ------------------------------------------------------------------


def test_not_installed_gives_one_line_install_hint(cli, monkeypatch, fast):
    monkeypatch.setitem(sys.modules, "tvm", None)  # `import tvm` now raises ImportError
    tx.import_tvm.cache_clear()
    try:
        with pytest.raises(RuntimeUnavailableError, match=r"not installed.*pip install 'squeeze\[tvm\]'"):
            tx.import_tvm()
        r = cli("bench", "testnets:tiny_cnn", "--input-shape", "1,3,16,16", "--target", "host-tvm", *fast)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1  # one line
        assert "pip install 'squeeze[tvm]'" in r.stderr and "Traceback" not in r.stderr
    finally:
        tx.import_tvm.cache_clear()


def test_ffi_pin_is_checked_before_import(monkeypatch):
    monkeypatch.setattr(tx, "_installed", lambda dist: "0.1.15" if dist == "apache-tvm-ffi" else "0.27.0.post1")
    tx.import_tvm.cache_clear()
    try:
        with pytest.raises(RuntimeUnavailableError, match=r"ffi 0.1.15 is installed.*0.1.14.post1.*segfault"):
            tx.import_tvm()
    finally:
        tx.import_tvm.cache_clear()


# --- compiling ------------------------------------------------------------------------------------------------


@needs_cross_compiler
def test_cross_compiled_library_is_an_aarch64_elf(tiny):
    arm = load_target("arm-a72")
    lib = tx.build_library(tiny, arm, tune=False)
    assert tx.elf_machine(lib.path) == 183  # EM_AARCH64
    assert tx.expected_elf_machine(tx.resolve_target(arm)) == 183
    assert json.loads(lib.target_json)["mcpu"] == "cortex-a72"
    again = tx.build_library(tiny, arm, tune=False)
    assert again.path == lib.path  # cached by artifact + target + tuning state


def test_host_library_is_cached_per_batch_size(tiny, untuned):
    one, two = tx.build_library(tiny, untuned, 1), tx.build_library(tiny, untuned, 2)
    assert tx.elf_machine(one.path) == tx.expected_elf_machine(tx.resolve_target(untuned)) == 62  # EM_X86_64
    assert one.key != two.key and one.tuning is None


def test_missing_cross_compiler_is_named(tiny, tmp_path):
    t = load_target(str(write_target(tmp_path, "xc", "tvm: {target: {kind: llvm, mtriple: aarch64-linux-gnu}, "
                                                     "cross_compiler: no-such-g++}\n")))
    with pytest.raises(TargetError, match=r"cross-compiles with `no-such-g\+\+`, which is not on PATH"):
        tx.build_library(tiny, t, tune=False)


# --- running here ---------------------------------------------------------------------------------------------


def test_bench_cli_labels_untuned_figures(cli, tmp_path, untuned, fast):
    out = tmp_path / "b.json"
    r = cli("bench", "testnets:tiny_cnn", "--input-shape", "1,3,16,16", "--target", untuned.source, *fast,
            "--json", out)
    assert r.exit_code == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert f"latency on {untuned.name}: untuned (not the target's tuned latency)" in text  # the table's title
    assert text.count("untuned (not the target's tuned latency)") == 2  # and the protocol line under it
    m = json.loads(out.read_text())["models"][0]["measurement"]
    env = m["environment"]
    assert env["runtime"] == "tvm" and env["untuned"] is True and env["emulated"] is False
    assert env["runner"] == "local" and env["tuning"] == "none" and "llvm" in env["providers"][0]
    assert len(m["samples_ms"]) == 5 and m["stats"]["median_ms"] > 0


def test_tvm_output_is_compared_with_onnxruntime(tiny, untuned, monkeypatch):
    from squeeze.errors import ExportError
    from squeeze.measure import tvm as mt

    protocol = Protocol.for_target(untuned, repeat=3, warmup=1, min_repeat_ms=1)
    session = mt.TvmRuntime().open(tiny, untuned, protocol)
    assert session.sample(2) > 0 and session.samples[-1][0] == 2
    reference = mt.ort_reference
    monkeypatch.setattr(mt, "ort_reference", lambda artifact, x: reference(artifact, x) + 0.5)
    with pytest.raises(ExportError, match=r"differs from ONNX Runtime on the host: max abs error 0.5"):
        mt.TvmRuntime().open(tiny, untuned, protocol)


@pytest.mark.slow
def test_lut_builder_works_unchanged_on_a_tvm_target(untuned):
    from squeeze.measure.lut import LatencyTable, LayerConfig

    table = LatencyTable(untuned, Protocol.for_target(untuned, repeat=3, warmup=1, min_repeat_ms=2))
    small, big = (LayerConfig("conv2d", 8, c, 16, 16, (3, 3), (1, 1), (1, 1), 1) for c in (8, 64))
    entries = table.entries([small, big])
    assert entries[big.key].count == 3 and entries[big.key].median_ms > entries[small.key].median_ms > 0


# --- CUDA without a GPU: compile-only -----------------------------------------------------------------------


def test_cuda_without_gpu_is_compile_only(cli, fast):
    if tvm.cuda(0).exist:
        pytest.skip("this machine has a CUDA GPU")
    r = cli("bench", "zoo:digits-cnn", "--target", "cuda-tvm", *fast)
    assert r.exit_code == 2 and "can only be compiled on this machine (TVM finds no CUDA GPU here)" in r.stderr
    r = cli("targets", "check", "cuda-tvm", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    steps = {s["name"]: s for s in report["steps"]}
    assert report["passed"] and "CUDA kernels for sm_80" in steps["compile"]["detail"]
    assert steps["run"]["status"] == "skip" and "no latency is claimed" in steps["run"]["detail"]
    from squeeze.doctor import find_nvcc

    # nvcc compiled the generated source where it exists
    assert steps["nvcc"]["status"] == ("pass" if find_nvcc() else "skip")
    assert find_nvcc() is None or "cubin" in steps["nvcc"]["detail"]


# --- emulated boards: plumbing and numerics, never a budget ------------------------------------------------


def test_emulated_latency_is_never_a_budget_or_gate(cli, tmp_path, monkeypatch, fast):
    from squeeze.measure.tvm import labels_for

    monkeypatch.setenv("SQUEEZE_RPC_EMULATED", "1")
    monkeypatch.setenv("SQUEEZE_RPC_TRACKER", "127.0.0.1:9")
    monkeypatch.setenv("SQUEEZE_RPC_KEY", "arm64-emulated")
    arm = load_target("arm-a72")
    labels = labels_for(arm)
    assert labels["emulated"] and labels["untuned"] and labels["tuning"] == "none"  # no tuning on emulated timings
    r = cli("bench", "zoo:digits-cnn", "--against", "zoo:digits-cnn", "--target", "arm-a72", *fast)
    assert r.exit_code == 2 and "emulated board (qemu)" in r.stderr and "a latency gate" in r.stderr
    r = cli("prune", "zoo:digits-cnn", "--target", "arm-a72", "--latency", "0.5x", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "cannot be used as a latency budget" in r.stderr and not (tmp_path / "o").exists()


def test_reports_label_emulated_figures():
    from squeeze.measure.bench import Measurement
    from squeeze.report.render import protocol_line

    env = {"runtime": "tvm", "runtime_version": "0.27", "providers": ["llvm cortex-a72 via RPC"], "cpu": "host",
           "load_avg_1m": 0.1, "untuned": True, "emulated": True}
    m = Measurement("sha", "arm-a72", {"threads": 4, "batch_size": 1, "warmup": 1, "min_repeat_ms": 1},
                    [1.0, 1.1, 1.0], 1, env, "run")
    line = protocol_line(m)
    assert "emulated (not ARM latency)" in line and "untuned" in line


# --- tuning database --------------------------------------------------------------------------------------


def test_tuning_database_is_reused_and_keys_the_library(tiny, tmp_path, monkeypatch, caplog):
    """The reuse logic without tuning: layers recorded as tuned are not tuned again, and how far each layer
    is tuned is part of the compiled library's key. Before tuning, the user is told how much and how long."""
    from squeeze.export import tuning

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    target = load_target(str(write_target(tmp_path, "tuned", "tvm: {target: detect, tuning: metaschedule, "
                                                             "tuning_trials: 4}\n")))
    tvm_target = tx.resolve_target(target)
    lowered = tx.lower_for_tuning(tx.relax_module(tiny, 1), tvm_target)
    tasks = tuning.extract_tasks(lowered, tvm_target)
    assert len(tasks) >= 3 and any("conv2d" in t.task_name for t in tasks)
    tuned_now = []

    asked = []

    def fake_tune(task, db, trials, *args):
        tuned_now.append(task.task_name)
        asked.append(trials)
        return True

    monkeypatch.setattr(tuning, "_tune_one", fake_tune)
    monkeypatch.setattr(tuning, "_builder_and_runner", lambda target: (None, None))
    caplog.set_level("INFO", logger="squeeze.tuning")
    first = tuning.ensure_tuned(lowered, tvm_target, target)
    assert f"tuning {len(tasks)} layers x 4 trials" in caplog.text and "no estimate" in caplog.text
    caplog.clear()
    assert sorted(first.tuned) == sorted(tuned_now) == sorted(t.task_name for t in tasks) and first.reused == 0
    db = tuning.TuningDatabase(tvm_target)
    assert all(db.trials_done(t.dispatched[0]) == 4 for t in tasks)
    tuned_now.clear()
    second = tuning.ensure_tuned(lowered, tvm_target, target)
    assert tuned_now == [] and second.reused == len(tasks) and second.state == first.state
    # More trials asked: every layer is tuned further, and the library key moves with the state.
    more = target.model_copy(update={"tvm": target.tvm.model_copy(update={"tuning_trials": 8})})
    third = tuning.ensure_tuned(lowered, tvm_target, more)
    # Now timed here: the estimate comes from those tunings (the fake takes no time: under a minute).
    assert f"tuning {len(tasks)} layers x 8 trials on tuned ({4 * len(tasks)} trials to run), under a minute on " \
           "this machine" in caplog.text
    assert len(tuned_now) == len(tasks) and third.state != first.state
    assert asked[-len(tasks):] == [4] * len(tasks)  # by the 4 trials each lacks, not 8 again
    # The same layer shapes in another model reuse the records: a wider first conv changes only its own layers.
    import testnets
    from squeeze.export.onnx import export_onnx
    from squeeze.model.loading import LoadedModel

    other = export_onnx(LoadedModel("other", "factory", (1, 3, 16, 16), testnets.tiny_cnn(num_classes=6)),
                        exporter="torchscript")
    other_lowered = tx.lower_for_tuning(tx.relax_module(other, 1), tvm_target)
    tuned_now.clear()
    report = tuning.ensure_tuned(other_lowered, tvm_target, more)
    assert 0 < len(tuned_now) < report.tasks and report.reused == report.tasks - len(tuned_now)


def test_second_build_of_a_tuned_model_skips_import_and_lowering(tiny, tmp_path, monkeypatch):
    from squeeze.export import tuning

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    target = load_target(str(write_target(tmp_path, "tuned", "tvm: {target: detect, tuning: metaschedule, "
                                                             "tuning_trials: 2}\n")))
    monkeypatch.setattr(tuning, "_tune_one", lambda *a: True)
    monkeypatch.setattr(tuning, "_builder_and_runner", lambda target: (None, None))
    first = tx.build_library(tiny, target)
    assert first.tuning["tasks"] == len(first.tuning["tuned_now"]) > 0

    def no_import(*a):
        raise AssertionError("imported the ONNX model again")

    monkeypatch.setattr(tx, "relax_module", no_import)
    second = tx.build_library(tiny, target)
    assert second.path == first.path and second.tuning["tuned_now"] == []
    assert second.tuning["state"] == first.tuning["state"]


def test_a_layer_without_any_valid_schedule_fails_clearly(tiny, tmp_path, monkeypatch):
    from squeeze.export import tuning

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    target = load_target(str(write_target(tmp_path, "tuned", "tvm: {target: detect, tuning: metaschedule, "
                                                             "tuning_trials: 2}\n")))
    monkeypatch.setattr(tuning, "_tune_one", lambda task, *a: task.task_name != "fused_conv2d_add_relu")
    monkeypatch.setattr(tuning, "_builder_and_runner", lambda target: (None, None))
    with pytest.raises(tuning.TuningError, match=r"no valid schedule for 1 layer.*\(fused_conv2d_add_relu\).*\.log"):
        tx.build_library(tiny, target)


@pytest.mark.slow
def test_real_tuning_then_second_build_hits_the_database(tmp_path, monkeypatch):
    """MetaSchedule for real on a one-conv model, 2 trials per layer (about 1-3 minutes on 2 loaded cores)."""
    from torch import nn

    from squeeze.export.onnx import export_onnx
    from squeeze.export import tuning
    from squeeze.measure.bench import measure
    from squeeze.model.loading import LoadedModel

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    art = export_onnx(LoadedModel("one-conv", "factory", (1, 3, 8, 8), net), exporter="torchscript")
    target = load_target(str(write_target(tmp_path, "tuned", "tvm: {target: detect, tuning: metaschedule, "
                                                             "tuning_trials: 2}\n")))
    first = tx.build_library(art, target)
    assert first.tuning["tuned_now"] and first.tuning["reused"] == 0
    calls = []
    monkeypatch.setattr(tuning, "_tune_one", lambda *a: calls.append(a) or True)
    second = tx.build_library(art, target)
    assert calls == [] and second.path == first.path and second.tuning["tuned_now"] == []
    (m,) = measure([art], target, Protocol.for_target(target, repeat=3, warmup=1, min_repeat_ms=2), use_cache=False)
    assert m.environment["untuned"] is False and m.environment["tuning"].startswith("metaschedule")


# --- targets check ------------------------------------------------------------------------------------------


def test_targets_check_local_passes_with_numerics(cli, untuned):
    r = cli("targets", "check", untuned.source, "--json")
    assert r.exit_code == 0, r.stderr
    steps = {s["name"]: s for s in json.loads(r.stdout)["steps"]}
    assert [n for n, s in steps.items() if s["status"] == "pass"] == [
        "TVM importable", "export", "compile", "device", "run", "numerics vs ORT", "latency"]
    assert steps["cross-compile"]["status"] == "skip"
    err = float(steps["numerics vs ORT"]["detail"].split()[3])
    assert err < 1e-4 and "labelled: untuned" in steps["latency"]["detail"]


def test_targets_check_onnxruntime(cli):
    r = cli("targets", "check", "host-cpu")
    assert r.exit_code == 0 and "onnxruntime" in r.stdout and "median" in r.stdout
    assert "PASS: every applicable step works on `host-cpu`" in " ".join(r.stdout.split())


def test_a_measurement_workers_steps_and_log_lines_reach_the_caller(untuned, tiny, tmp_path, monkeypatch, caplog):
    import io
    import logging
    from types import SimpleNamespace

    from squeeze.measure import worker
    """Compiling (and tuning) happen in the worker that opens the model: their progress and log lines come back
    to the command's reporter and loggers, or a first TVM measurement would sit silent for minutes."""
    from squeeze import progress
    from squeeze.measure.bench import measure

    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path / "cache"))  # nothing compiled yet
    events = []

    class Recorder:
        def open(self, description, total, unit):
            events.append(("open", description))
            return self

        def advance(self, n=1, **fields):
            events.append(("advance", n))

        def describe(self, description):
            events.append(("describe", description))

        def close(self, task):
            events.append(("close",))

    with progress.reporting(Recorder()):
        measure([tiny], untuned, Protocol.for_target(untuned, repeat=3, warmup=1, min_repeat_ms=1), use_cache=False)
    assert events[0] == ("open", f"compiling {tiny.path.name} for cpu-untuned (untuned)") and events[-1] == ("close",)
    assert events.count(("close",)) == sum(e[0] == "open" for e in events)  # every step the worker opened, closed
    # The frames a worker sends while the caller awaits a reply: a log record is logged here, under its name.
    frames = io.BytesIO()
    for frame in [("log", ("squeeze.tuning", logging.INFO, "tuning 3 layers x 8 trials")),
                  ("progress", ("open", 0, "tuning 3 of 3 layers", 24, "trials")), ("progress", ("advance", 0, 8, {})),
                  ("progress", ("close", 0)), ("samples", {0: 1.5})]:
        worker._send(frames, frame)
    frames.seek(0)
    client = object.__new__(worker.WorkerClient)
    client._proc, client._tasks = SimpleNamespace(stdout=frames), {}
    events.clear()
    caplog.set_level("INFO", logger="squeeze.tuning")
    with progress.reporting(Recorder()):
        assert client._recv("samples") == {0: 1.5}
    assert events == [("open", "tuning 3 of 3 layers"), ("advance", 8), ("close",)]
    assert "tuning 3 layers x 8 trials" in caplog.text
