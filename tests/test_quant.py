"""Quantization building blocks: the QDQ graph ORT produces, parity, calibration, QAT's fake-quant, the
type-choice and auto-exclusion logic (on fake measurements and profiles), target and budget checks."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from squeeze.data import load_data
from squeeze.errors import DataError
from squeeze.export.onnx import export_onnx
from squeeze.export.ort import run_batched
from squeeze.measure.profile import (
    LayerProfile,
    layer_identities,
    profile_layers,
    slower_layers,
)
from squeeze.measure.protocol import Protocol
from squeeze.measure.stats import RatioEstimate
from squeeze.methods.quant.int8 import exclusion_search, rank_fastest, type_candidates
from squeeze.model.loading import load_model
from squeeze.quant.calibrate import calibration_data
from squeeze.quant.ptq import (
    QuantConfig,
    QuantizeError,
    compare_outputs,
    layer_nodes,
    layer_precisions,
    op_counts,
    quantize_onnx,
)
from squeeze.quant.run import (
    QuantBudgetError,
    QuantTargetError,
    check_budget,
    check_target,
    is_faster,
)
from squeeze.recipe import Budget
from squeeze.target import Target, load_target

DIGITS_LAYERS = ["conv1.0", "conv2.0", "conv3.0", "conv4.0", "conv5.0", "fc"]


@pytest.fixture(scope="module")
def digits_model():
    return load_model("zoo:digits-cnn")


@pytest.fixture(scope="module")
def fp32(digits_model):
    return export_onnx(digits_model)


@pytest.fixture(scope="module")
def data(digits_model):
    return load_data("digits", input_shape=digits_model.input_shape)


@pytest.fixture(scope="module")
def calib(data):
    return calibration_data(data, 64)


@pytest.fixture(scope="module")
def test_x(data):
    return np.stack([data.test[i][0].numpy() for i in range(len(data.test))])


def _producers(model):
    return {out: n for n in model.graph.node for out in n.output}


# --- the QDQ graph ---------------------------------------------------------------------------------


def test_int8_qdq_graph_node_counts(fp32, calib):
    q = quantize_onnx(fp32, calib, QuantConfig())
    counts = op_counts(q.path)
    # 11 quantized activations (input, 5 conv outputs after ReLU removal, 2 shared by MaxPool, the Add,
    # the flattened features, the logits); 6 weights + 6 biases + 11 activations dequantized.
    assert counts["QuantizeLinear"] == 11 and counts["DequantizeLinear"] == 23
    assert counts["Conv"] == 5 and counts["Gemm"] == 1 and "Relu" not in counts  # ReLU folded into the ranges
    model = onnx.load(str(q.path))
    producers = _producers(model)
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):  # activation and weight come from DequantizeLinear
            assert [producers[i].op_type for i in node.input[:2]] == ["DequantizeLinear"] * 2
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["conv1.0.weight_quantized"].data_type == onnx.TensorProto.INT8
    assert inits["input_zero_point"].data_type == onnx.TensorProto.UINT8  # uint8 activations
    assert numpy_helper.to_array(inits["conv2.0.weight_scale"]).shape == (32,)  # per output channel
    assert layer_precisions(q.path) == dict.fromkeys(DIGITS_LAYERS, "int8")
    assert q.exporter == "dynamo+qdq" and q.parity is None and q.input_shape == fp32.input_shape


def test_excluded_layers_stay_float(fp32, calib):
    q = quantize_onnx(fp32, calib, QuantConfig(exclude=["conv2.0"], per_layer={"fc": "fp32", "conv3.0": "int16"}))
    assert layer_precisions(q.path) == {"conv1.0": "int8", "conv2.0": "fp32", "conv3.0": "int16", "conv4.0": "int8",
                                        "conv5.0": "int8", "fc": "fp32"}
    model = onnx.load(str(q.path))
    inits = {i.name for i in model.graph.initializer}
    assert {"conv2.0.weight", "fc.weight"} <= inits  # float weights, read directly
    assert not {"conv2.0.weight_quantized", "fc.weight_quantized"} & inits
    assert op_counts(q.path)["DequantizeLinear"] < 23


def test_per_tensor_and_int8_activations(fp32, calib):
    q = quantize_onnx(fp32, calib, QuantConfig(per_channel=False, activation_type="int8"))
    inits = {i.name: i for i in onnx.load(str(q.path)).graph.initializer}
    assert numpy_helper.to_array(inits["conv2.0.weight_scale"]).shape == ()
    assert inits["input_zero_point"].data_type == onnx.TensorProto.INT8


def test_unknown_layer_is_an_error(fp32, calib):
    with pytest.raises(QuantizeError, match=r"Unknown layer\(s\) conv9 .*Layers of this model: conv1.0, conv2.0"):
        quantize_onnx(fp32, calib, QuantConfig(exclude=["conv9"]))


def test_quantized_artifacts_are_cached_by_content(fp32, calib, monkeypatch):
    first = quantize_onnx(fp32, calib, QuantConfig())
    import squeeze.quant.ptq as ptq

    ptq._memo.clear()
    monkeypatch.setattr(ptq, "_quantize", lambda *a, **k: pytest.fail("re-quantized"))
    again = quantize_onnx(fp32, calib, QuantConfig())
    assert again.path == first.path and again.sha256 == first.sha256
    monkeypatch.undo()
    assert quantize_onnx(fp32, calibration_data(load_data("digits"), 32), QuantConfig()).path != first.path


def test_layer_nodes_name_torch_layers_for_both_exporters(digits_model, fp32):
    ts = export_onnx(digits_model, exporter="torchscript")
    assert list(layer_nodes(fp32)) == list(layer_nodes(ts)) == DIGITS_LAYERS
    assert layer_nodes(ts)["conv1.0"] == "/conv1/conv1.0/Conv"


def test_layer_names_of_nested_modules():
    from squeeze.quant.ptq import _scope_path

    assert _scope_path("stages/stages.0/stages.0.0/conv1/conv1.0".split("/")) == "stages.0.0.conv1.0"
    assert _scope_path(["fc"]) == "fc"
    resnet = load_model("zoo:resnet18", input_shape=(1, 3, 32, 32))
    modules = dict(resnet.module.named_modules())
    names = list(layer_nodes(export_onnx(resnet, exporter="torchscript")))
    assert len(names) == 21 and all(isinstance(modules[n], (torch.nn.Conv2d, torch.nn.Linear)) for n in names)


# --- parity ----------------------------------------------------------------------------------------


def test_compare_outputs_math():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    p = compare_outputs(ref, ref + np.array([[0.0, 0.1], [0.0, 0.0]]))
    assert p.snr_db == pytest.approx(10 * np.log10(2 / 0.01)) and p.top1_agreement == 1.0 and p.n == 2
    flipped = compare_outputs(ref, ref[:, ::-1])
    assert flipped.top1_agreement == 0.0 and flipped.max_abs_err == 1.0
    assert compare_outputs(ref, ref).snr_db == float("inf")


@pytest.mark.parametrize("config", [QuantConfig(reduce_range=True), QuantConfig(weight_type="uint8")],
                         ids=["u8s8-7bit", "u8u8"])
def test_int8_parity_on_digits(fp32, calib, test_x, config):
    """The candidates whose kernels cannot saturate keep parity on any x86 CPU (8-bit u8s8 may not, on one
    without VNNI: that is what the floor is for, tested on fakes below)."""
    p = compare_outputs(run_batched(fp32, test_x), run_batched(quantize_onnx(fp32, calib, config), test_x))
    assert p.n == 360 and p.top1_agreement >= 0.99 and p.snr_db > 25


def test_reduce_range_stores_7_bit_weights(fp32, calib):
    model = onnx.load(str(quantize_onnx(fp32, calib, QuantConfig(reduce_range=True)).path))
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("weight_quantized")]
    assert len(weights) == 6 and all(w.dtype == np.int8 and -64 <= w.min() and w.max() <= 64 for w in weights)
    assert max(int(np.abs(w).max()) for w in weights) == 64


# --- calibration -----------------------------------------------------------------------------------


def test_calibration_samples_are_seeded_train_samples(data):
    a, b = calibration_data(data, 50, seed=1), calibration_data(data, 50, seed=1)
    assert a.inputs.shape == (50, 1, 16, 16) and a.fingerprint == b.fingerprint
    assert calibration_data(data, 50, seed=2).fingerprint != a.fingerprint
    assert calibration_data(data, 10**6).n == len(data.train)
    assert [len(x) for x in a.batches()] == [32, 18]
    with pytest.raises(DataError, match="at least one sample"):
        calibration_data(data, 0)


def test_calibration_methods_choose_different_ranges(fp32, calib):
    def scale(method):  # of conv2's output, post-ReLU: a long tail of rare large values
        q = quantize_onnx(fp32, calib, QuantConfig(calibration=method))
        inits = {i.name: i for i in onnx.load(str(q.path)).graph.initializer}
        return float(numpy_helper.to_array(inits["relu_1_scale"]))

    minmax, entropy, percentile = (scale(m) for m in ("minmax", "entropy", "percentile"))
    assert entropy < 0.75 * minmax  # the KL-optimal clip cuts the tail
    assert percentile < minmax  # 99.999th percentile: just below the maximum


# --- type choice and auto-exclusion logic ---------------------------------------------------------


def _ratio(r, spread=0.05):
    return RatioEstimate(r, r - spread, r + spread, 0.95, 30, "fake")


def test_type_candidates_follow_the_options():
    assert type_candidates("auto", "auto") == [("uint8", "int8", False), ("int8", "int8", False),
                                               ("uint8", "uint8", False)]
    assert type_candidates("int8", "auto") == [("int8", "int8", False)]
    assert type_candidates("uint8", "uint8") == [("uint8", "uint8", False)]


def test_7_bit_weights_are_tried_where_the_cpu_has_no_int8_dot_product():
    assert type_candidates("auto", "auto", "auto", dot_product=True) == type_candidates("auto", "auto")
    assert type_candidates("auto", "auto", "auto", dot_product=False) == [
        ("uint8", "int8", False), ("uint8", "int8", True), ("int8", "int8", False), ("int8", "int8", True),
        ("uint8", "uint8", False)]
    # uint8 weights take kernels that cannot saturate: never reduced, whatever the option says.
    assert type_candidates("uint8", "auto", "on") == [("uint8", "int8", True), ("uint8", "uint8", False)]
    assert type_candidates("uint8", "int8", "off", dot_product=False) == [("uint8", "int8", False)]


def test_cpu_features_are_read_and_recorded():
    from squeeze.measure.environment import cpu_features, environment

    feats = cpu_features()
    assert isinstance(feats["int8_dot_product"], bool) and isinstance(feats["int8_isa"], list)
    # What CPUID says, not /proc/cpuinfo (under an emulator that describes the host).
    from squeeze.measure.environment import _cpuid

    cpuid = _cpuid()

    assert ("AVX-512 VNNI" in feats["int8_isa"]) == bool(cpuid.get("AVX512VNNI"))
    assert ("AVX2" in feats["int8_isa"]) == bool(cpuid.get("AVX2"))
    if cpuid.get("AVX512VNNI"):
        assert feats["int8_dot_product"]
    assert environment("onnxruntime", "1", ["CPUExecutionProvider"], 1)["cpu_int8"] == feats


def test_rank_fastest_orders_by_measured_speedup():
    configs = [QuantConfig(activation_type=a, weight_type=w) for a, w, _ in type_candidates("auto", "auto")]
    measured = list(zip(configs, [_ratio(2.4), _ratio(0.85), _ratio(1.1)]))
    assert [c.label() for c, _ in rank_fastest(measured)] == ["a:uint8 w:int8", "a:uint8 w:uint8", "a:int8 w:int8"]
    measured = list(zip(configs, [_ratio(0.9), _ratio(1.3), _ratio(1.1)]))  # as measured, not as assumed
    assert rank_fastest(measured)[0][0].label() == "a:int8 w:int8"


def test_faster_means_the_whole_interval_above_one():
    assert is_faster(_ratio(1.2, 0.1)) and not is_faster(_ratio(1.04, 0.05)) and not is_faster(_ratio(0.8))


class _FakeModel:
    """Per-layer costs (fp32 vs quantized); a config's speedup is their ratio, deterministic."""

    fp32 = {"a": 10.0, "b": 10.0, "c": 10.0, "d": 10.0}

    def __init__(self, quantized):
        self.quantized = quantized
        self.measured = []

    def speedup(self, config):
        self.measured.append(sorted(config.float_layers()))
        t = sum(self.fp32[k] if k in config.float_layers() else self.quantized[k] for k in self.fp32)
        return _ratio(sum(self.fp32.values()) / t)

    def blame(self, config):
        return sorted(((k, self.quantized[k] - self.fp32[k]) for k in self.fp32
                       if k not in config.float_layers() and self.quantized[k] > self.fp32[k]), key=lambda t: -t[1])


def test_exclusion_search_removes_the_blamed_layers_until_faster():
    fake = _FakeModel({"a": 4.0, "b": 30.0, "c": 5.0, "d": 14.0})  # quantized total 53 > 40: slower
    config, steps = exclusion_search(QuantConfig(), list(fake.fp32), is_faster, fake.speedup, fake.blame, 4)
    assert config is not None and sorted(config.float_layers()) == ["b", "d"]
    assert [s.excluded for s in steps] == [["b", "d"]] and steps[0].blamed == {"b": 20.0, "d": 4.0}
    assert steps[0].speedup.ratio == pytest.approx(40 / 29)


def test_exclusion_search_falls_back_when_nothing_is_faster():
    fake = _FakeModel({"a": 12.0, "b": 30.0, "c": 11.0, "d": 14.0})  # every layer slower quantized
    config, steps = exclusion_search(QuantConfig(), list(fake.fp32), is_faster, fake.speedup, fake.blame, 4)
    assert config is None and steps[-1].speedup is None and steps[-1].excluded == ["a", "b", "c", "d"]
    assert fake.measured == []  # an all-float model is the fp32 model: nothing to measure

    no_blame = _FakeModel({"a": 10.0, "b": 10.0, "c": 10.0, "d": 10.0})  # not faster, nothing to blame
    layers = list(fake.fp32)
    assert exclusion_search(QuantConfig(), layers, is_faster, no_blame.speedup, no_blame.blame, 4) == (None, [])


def test_slower_layers_uses_paired_runs():
    ref = LayerProfile({"a": [10, 10, 10, 10, 10], "b": [10, 10, 10, 10, 10], "c": [5, 5, 5, 5, 5]}, 0.0, 5)
    cand = LayerProfile({"a": [30, 31, 29, 30, 30], "b": [12, 9, 11, 9, 12], "c": [6, 6, 6, 6, 4]}, 0.0, 5)
    # b is slower on median but only in 3 of 5 pairs: noise, not blamed; c in 4 of 5.
    assert slower_layers(ref, cand, ["a", "b", "c"]) == [("a", 20.0), ("c", 1.0)]


def test_profile_maps_ort_nodes_to_torch_layers(fp32, calib):
    """Real ORT profiles: every layer is found in the fused fp32 graph and in the QLinearConv graph, and
    int8 activations (which ORT partly cannot fuse here) make some layers measurably slower."""
    ids = layer_identities(onnx.load(str(fp32.path)))
    assert ids["conv1.0"] == {"conv1.0.weight", "conv1.0.weight_bias"}
    q8 = quantize_onnx(fp32, calib, QuantConfig(activation_type="int8"))
    ref, cand = profile_layers([fp32, q8], ids, ["CPUExecutionProvider"], Protocol(threads=1, warmup=2), runs=10)
    assert set(ref.layer_us) == set(cand.layer_us) == set(DIGITS_LAYERS)
    assert all(len(v) == 10 for v in cand.layer_runs_us.values())
    assert ref.total_us > 0 and cand.total_us > 0


# --- targets and budgets ---------------------------------------------------------------------------


def test_target_checks():
    check_target("int8", load_target("host-cpu"))
    with pytest.raises(QuantTargetError, match="CUDA execution provider, which has no int8 convolution kernels"):
        check_target("int8", load_target("cuda"))
    with pytest.raises(QuantTargetError, match="no fp16 convolution kernels on x86"):
        check_target("fp16", load_target("host-cpu"))
    check_target("fp16", load_target("cuda"))
    tvm = Target.model_validate({"name": "board", "runtime": "tvm", "tvm": {"target": "llvm"}})
    with pytest.raises(QuantTargetError, match="through ONNX Runtime only; target `board` uses the `tvm` runtime"):
        check_target("int8", tvm)


def test_budgets_quantization_cannot_meet():
    with pytest.raises(QuantBudgetError, match="does not change the MACs"):
        check_budget(Budget(macs_ratio=0.5), 1000, 1, "int8")
    with pytest.raises(QuantBudgetError, match=r"1,000 parameters x 1 byte\(s\) = 1,000 bytes"):
        check_budget(Budget(size_bytes=999), 1000, 1, "int8")
    check_budget(Budget(size_bytes=1200), 1000, 1, "int8")
    check_budget(Budget(latency_ratio=0.5), 1000, 1, "int8")


# --- QAT's fake-quant matches what ORT does --------------------------------------------------------


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
def test_weight_fake_quant_equals_ort_weights(fp32, calib, reduce_range):
    from squeeze.quant.fakequant import WeightFakeQuant

    model = onnx.load(str(quantize_onnx(fp32, calib, QuantConfig(reduce_range=reduce_range)).path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    folded = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(fp32.path)).graph.initializer}
    for name in ("conv2.0.weight", "fc.weight"):
        w = torch.from_numpy(folded[name].copy())
        ours = WeightFakeQuant(per_channel=True, symmetric=True, reduce_range=reduce_range)(w).numpy()
        scale = inits[f"{name}_scale"].reshape(-1, *([1] * (w.ndim - 1)))
        theirs = inits[f"{name}_quantized"].astype(np.float32) * scale
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6 * np.abs(theirs).max())


def test_fake_quant_rounds_forward_and_passes_gradients_straight_through():
    from squeeze.quant.qat import FakeQuant

    fq = FakeQuant(0.5, 2, 0, 255, learn=True)
    x = torch.tensor([-2.0, 0.26, 1.0, 200.0], requires_grad=True)
    y = fq(x)
    assert y.tolist() == [-1.0, 0.5, 1.0, 126.5]  # clamp at qmin=0 -> -z*s; round; clamp at qmax
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0] and fq.scale.grad is not None


def test_qat_model_matches_its_ort_int8_export(digits_model, fp32, calib, test_x):
    """The fake-quant torch model and the QDQ model exported from it compute the same (no training:
    calibrated ranges), and a changed activation scale reaches the exported graph. 7-bit weights: ORT's
    8-bit u8s8 kernels may saturate on a CPU without VNNI, where the torch model does not."""
    from squeeze.quant.qat import build_qat_model, export_qat, quantized_activations

    config = QuantConfig(reduce_range=True)
    ptq = quantize_onnx(fp32, calib, config)
    qat = build_qat_model(digits_model.module, fp32, ptq, config, calib.inputs[:16], learn_ranges=True)
    assert len(qat.owners) == 9 and set(qat.tensor_fq) == set(quantized_activations(onnx.load(str(ptq.path))))
    exported = export_qat(qat, fp32, calib, config)
    with torch.no_grad():
        torch_out = qat.module(torch.from_numpy(test_x)).numpy()
    p = compare_outputs(torch_out, run_batched(exported, test_x))
    assert p.top1_agreement >= 0.99 and p.snr_db > 30
    assert layer_precisions(exported.path) == dict.fromkeys(DIGITS_LAYERS, "int8")

    fq = qat.module.get_submodule(next(k for k, v in qat.owners.items() if v == "relu_2"))
    fq.scale.data *= 1.5
    changed = quantized_activations(onnx.load(str(export_qat(qat, fp32, calib, config).path)))
    assert changed["relu_2"][1] == pytest.approx(float(fq.scale.detach()), rel=1e-6)
