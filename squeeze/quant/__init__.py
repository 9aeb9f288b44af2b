"""The quantization engine the methods (squeeze.methods.quant: int8, fp16, qat, haq) share.

  calibrate.py  CalibrationData: N samples of a --data set for ONNX Runtime's calibrators
  ptq.py        QuantConfig, layer_nodes, quantize_onnx (int8 QDQ, cached), to_fp16, output parity
  parity.py     the accuracy floor every quantized model must pass against fp32 (agreement, SNR, top-1)
  fakequant.py  weight fake-quantization in torch by ORT's rules (QAT and HAQ)
  costs.py      per-layer cost table in every precision the target runs (HAQ's hardware feedback)
  mixed.py      4-bit weight-only MatMulNBits layers
  qat.py        QAT's fake-quant model matched to the QDQ graph, and its export back to that graph
  haq.py        HAQ's agent environment, budget wall, fake-quant model and policy export
  run.py        what int8, fp16 and QAT share: refusals before work, measured speedups, final checks

Names are imported on first use, so importing this package (recipe validation, listing) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "CalibrationData": "calibrate",
    "calibration_data": "calibrate",
    "QuantConfig": "ptq",
    "layer_nodes": "ptq",
    "quantize_onnx": "ptq",
    "layer_precisions": "ptq",
    "to_fp16": "ptq",
    "compare_outputs": "ptq",
}

__all__ = sorted(_SOURCES)


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'squeeze.quant' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"squeeze.quant.{source}"), name)
    globals()[name] = value
    return value
