import pytest

from squeeze.errors import RuntimeUnavailableError, TargetError
from squeeze.measure.runtimes import get_runtime
from squeeze.target import Target, list_targets, load_target


def test_shipped_targets():
    names = {t.name for t in list_targets()}
    assert {"host-cpu", "cuda"} <= names
    host = load_target("host-cpu")
    assert host.runtime == "onnxruntime" and host.providers == ["CPUExecutionProvider"]
    assert host.protocol.repeat >= 3


def test_unknown_target_lists_known():
    with pytest.raises(TargetError, match=r"Unknown target `arm-a99`.*Known targets: .*host-cpu"):
        load_target("arm-a99")


def test_user_target_file(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nruntime: onnxruntime\nthreads: 1\nprotocol: {repeat: 5}\n")
    t = load_target(str(p))
    assert t.name == "mine" and t.threads == 1 and t.protocol.repeat == 5


def test_tvm_fields_are_in_the_schema(tmp_path):
    p = tmp_path / "a72.yaml"
    p.write_text(
        "name: a72\nruntime: tvm\ndevice: arm\n"
        "tvm:\n  target: {kind: llvm, mtriple: aarch64-linux-gnu, mcpu: cortex-a72}\n  runner: rpc\n"
        "  cross_compiler: aarch64-linux-gnu-g++\n  tuning: metaschedule\n  tuning_trials: 64\n"
        "  rpc: {tracker: '127.0.0.1:9190', key: rpi4, session_timeout_s: 60}\n"
    )
    t = load_target(str(p))
    assert t.tvm.runner == "rpc" and t.tvm.rpc.key == "rpi4" and t.tvm.target["mcpu"] == "cortex-a72"
    assert get_runtime(t).name == "tvm"  # registered; tests/test_tvm.py covers TVM missing (the install hint)


def test_tvm_runtime_needs_tvm_section(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("name: t\nruntime: tvm\n")
    with pytest.raises(TargetError, match="needs a `tvm:` section"):
        load_target(str(p))


def test_invalid_field_names_key_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: bad\nruntime: onnxruntime\nprotocol:\n  repeat: 1\n")
    with pytest.raises(TargetError, match=r"bad.yaml:4: `protocol.repeat`: Input should be greater than or equal to 3"):
        load_target(str(p))
    p.write_text("name: bad\nruntime: openvino\n")
    with pytest.raises(TargetError, match=r"`runtime`: .*unknown runtime `openvino`; registered runtimes: onnxruntime, tvm .*squeeze.runtimes"):
        load_target(str(p))


def test_cuda_without_gpu_is_a_clear_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with pytest.raises(RuntimeUnavailableError, match=r"needs ONNX Runtime's CUDAExecutionProvider.*onnxruntime-gpu"):
        get_runtime(load_target("cuda")).providers(load_target("cuda"))


def test_schema_forbids_unknown_keys():
    with pytest.raises(Exception, match="Extra inputs are not permitted"):
        Target(name="x", runtime="onnxruntime", colour="red")
