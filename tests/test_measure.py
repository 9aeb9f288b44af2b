import pytest

from squeeze.export.onnx import export_onnx
from squeeze.measure.bench import measure
from squeeze.measure.gate import GateConfig, gate_against_baseline, run_gate
from squeeze.measure.oracle import MeasuredOracle
from squeeze.measure.protocol import Protocol
from squeeze.model.loading import load_model
from squeeze.target import load_target

HOST = load_target("host-cpu")
FAST = Protocol.for_target(HOST, repeat=6, warmup=2, min_repeat_ms=2)


def _stack(layers: int):
    import testnets
    from squeeze.model.loading import LoadedModel

    return export_onnx(LoadedModel(f"stack{layers}", "factory", (1, 3, 24, 24), testnets.conv_stack(layers)))


def test_protocol_from_target_with_overrides():
    p = Protocol.for_target(HOST, repeat=7, threads=None)
    assert p.repeat == 7 and p.warmup == HOST.protocol.warmup and p.threads >= 1


def test_measure_records_protocol_and_environment():
    art = _stack(2)
    (m,) = measure([art], HOST, FAST, use_cache=False)
    assert m.stats.n == 6 and len(m.samples_ms) == 6 and m.stats.median_ms > 0
    assert m.calls_per_sample >= 1 and m.protocol["repeat"] == 6
    env = m.environment
    assert env["runtime"] == "onnxruntime" and env["providers"] == ["CPUExecutionProvider"] and env["threads"] >= 1


def test_measurements_are_cached_per_content_and_protocol():
    a, b = _stack(3), _stack(4)
    first = measure([a, b], HOST, FAST)
    again = measure([a, b], HOST, FAST)
    assert all(m.cached for m in again) and [m.samples_ms for m in again] == [m.samples_ms for m in first]
    # One model alone was cached as part of a pair run -> still the same run, still a hit.
    assert measure([a], HOST, FAST)[0].cached
    other = Protocol.for_target(HOST, repeat=7, warmup=2, min_repeat_ms=2)
    assert not measure([a], HOST, other)[0].cached
    assert not any(m.cached for m in measure([a, b], HOST, FAST, use_cache=False))


def test_interleaved_run_orders_models_correctly():
    small, big = _stack(1), _stack(10)
    m_small, m_big = measure([small, big], HOST, FAST, use_cache=False)
    assert m_big.stats.median_ms > 3 * m_small.stats.median_ms


def test_oracle_returns_measured_median():
    oracle = MeasuredOracle(HOST, FAST)
    model = load_model("testnets:conv_stack", input_shape=(1, 3, 24, 24))
    ms = oracle.latency_ms(model)
    assert ms == oracle.measurement(model).stats.median_ms  # second call: cached measurement


def test_gate_passes_identical_models():
    cfg = GateConfig(max_regression=0.05, max_time_s=30)
    r = run_gate(_stack(6), _stack(6), HOST, FAST, cfg)
    # On a loaded machine the interval may stay wide ("inconclusive") and the point estimate wander (0.5 was
    # seen with another process on both cores); the contract is that it is never a false FAIL.
    assert r.verdict in ("pass", "inconclusive") and r.ratio.low <= 1.05


def test_gate_fails_clearly_slower_model():
    cfg = GateConfig(max_regression=0.05, max_time_s=30)  # a noisy machine asks for more rounds, not a pass
    r = run_gate(_stack(12), _stack(4), HOST, FAST, cfg)
    assert r.verdict == "fail" and r.failed and r.ratio.low > 1.05 and r.ratio.ratio > 2
    # The gate's own protocol: one call per sample for both models, whatever the target's min_repeat_ms.
    assert r.new.calls_per_sample == r.old.calls_per_sample == 1 and r.new.protocol["min_repeat_ms"] == 0


def test_gate_against_stored_baseline():
    base = _stack(4)
    protocol = FAST.model_copy(update={"repeat": 20})
    (stored,) = measure([base], HOST, protocol, use_cache=False)
    cfg = GateConfig(max_regression=0.05)
    slow = gate_against_baseline(_stack(12), stored, HOST, protocol, cfg)
    # ~3x the work. The baseline was measured at another moment, so load drift between the two moves the
    # ratio; the contract is that a much slower model never passes.
    assert slow.mode == "baseline" and slow.verdict in ("fail", "inconclusive") and slow.ratio.ratio > 1.5


def test_gate_threshold_is_used():
    cfg = GateConfig(max_regression=5.0)  # 500% slower allowed: a ~3x slower model passes
    assert run_gate(_stack(12), _stack(4), HOST, FAST, cfg).verdict == "pass"


def test_measuring_from_a_stdin_script_does_not_reimport_main():
    """The worker is its own module: a caller's unguarded main script must not run again."""
    import subprocess
    import sys

    code = (
        "print('main ran')\n"
        "from squeeze.measure.bench import measure\n"
        "from squeeze.measure.protocol import Protocol\n"
        "from squeeze.export.onnx import export_onnx\n"
        "from squeeze.model.loading import load_model\n"
        "from squeeze.target import load_target\n"
        "t = load_target('host-cpu')\n"
        "a = export_onnx(load_model('testnets:conv_stack', input_shape=(1, 3, 8, 8)))\n"
        "print(measure([a], t, Protocol.for_target(t, repeat=3, warmup=1, min_repeat_ms=1), use_cache=False)[0].stats.n)\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["main", "ran", "3"]


def test_relative_oracle_reuses_one_worker():
    from squeeze.measure.oracle import RelativeOracle

    ref = load_model("testnets:conv_stack", input_shape=(1, 3, 24, 24))
    oracle = RelativeOracle(ref, HOST, FAST)
    worker = oracle.worker
    bigger = load_model("testnets:conv_stack", input_shape=(1, 3, 24, 24))
    import testnets

    bigger.module = testnets.conv_stack(layers=8)
    assert oracle.latency_ms(bigger) > 2 * oracle.reference_ms  # 8 conv layers vs 2
    assert oracle.latency_ms(ref) == oracle.reference_ms
    assert oracle.worker is worker and worker.alive  # the same process served every measurement
    worker.close()
    assert not worker.alive and oracle.worker is not worker  # a dead worker is replaced


def test_a_runtime_failure_in_the_worker_arrives_as_a_clear_error(tmp_path):
    from squeeze.export.artifact import OnnxArtifact
    from squeeze.measure.worker import WorkerError

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    artifact = OnnxArtifact(broken, "0" * 64, "x", (1, 3, 8, 8), "onnx", None)
    with pytest.raises(WorkerError, match=r"The measurement on `host-cpu` failed") as e:
        measure([artifact], HOST, FAST, use_cache=False)
    assert "--debug" in e.value.fix
