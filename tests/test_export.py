import numpy as np
import onnxruntime as ort
import pytest
import torch

import squeeze.export.onnx as exp
from squeeze.errors import ExportError
from squeeze.export.artifact import compare_outputs
from squeeze.model.loading import load_model


def test_export_parity_and_dynamic_batch():
    m = load_model("zoo:digits-cnn")
    art = exp.export_onnx(m)
    assert art.exporter == "dynamo" and art.parity.passed and art.parity.max_abs_err < 1e-4
    sess = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 16, 16)
    got = sess.run(None, {art.input_name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, m.module(x).numpy(), atol=1e-4)


def test_export_is_cached_by_content(monkeypatch):
    m = load_model("testnets:tiny_cnn", input_shape=(1, 3, 10, 10))
    first = exp.export_onnx(m)

    def boom(*a, **k):
        raise AssertionError("exported twice")

    monkeypatch.setattr(exp, "_run_exporter", boom)
    assert exp.export_onnx(m) == first  # in-process memo
    exp._memo.clear()
    assert exp.export_onnx(m).sha256 == first.sha256  # on-disk cache across processes
    with torch.no_grad():
        m.module[0].weight += 1  # new content -> a new export is needed
    with pytest.raises(ExportError, match="could not be exported"):
        exp.export_onnx(m)


def test_torchscript_exporter_option():
    art = exp.export_onnx(load_model("testnets:tiny_cnn", input_shape=(1, 3, 9, 9)), exporter="torchscript")
    assert art.exporter == "torchscript" and art.parity.passed


def test_parity_failure_is_reported():
    m = load_model("testnets:noisy", input_shape=(1, 3, 4, 4))
    with pytest.raises(ExportError, match=r"differs from the torch model: max abs error .*, .* of the output's largest "
                                          r"magnitude \(allowed: \|err\| <= max\(atol, rtol \* max\|output\|\)"):
        exp.export_onnx(m, use_cache=False)


def test_parity_scales_the_absolute_tolerance_to_the_output_range():
    """|err| <= max(atol, rtol * max|ref|) + rtol * |ref|: an element near zero among outputs of size 3
    may carry their absolute error (an element-wise relative error there is meaningless)."""
    ref = np.array([[3.2, 1e-3, -0.5]])
    near_zero_off = ref + np.array([[0.0, 3.2e-4, 0.0]])  # 32% off element-wise, 1e-4 of the output's range
    p = compare_outputs(near_zero_off, ref, atol=1e-4, rtol=1e-3)
    assert p.passed and p.max_abs_err == pytest.approx(3.2e-4) and p.max_rel_err == pytest.approx(1e-4)
    assert not compare_outputs(ref + [[0.0, 7e-3, 0.0]], ref, atol=1e-4, rtol=1e-3).passed  # > 3.2e-3 + 1e-6
    small = np.array([[1e-5, -2e-5]])  # all outputs near zero: atol is the floor
    assert compare_outputs(small + 5e-5, small, atol=1e-4, rtol=1e-3).passed
    assert not compare_outputs(small + 2e-4, small, atol=1e-4, rtol=1e-3).passed
    mismatch = compare_outputs(ref[:, :2], ref, atol=1e-4, rtol=1e-3)
    assert not mismatch.passed and mismatch.max_abs_err == float("inf")
