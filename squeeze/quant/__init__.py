"""Quantization: calibration, int8 QDQ / fp16 export, QAT, and the measured orchestration.

  calibrate.py  CalibrationData: N samples of a --data set for ONNX Runtime's calibrators
  ptq.py        QuantConfig, layer_nodes, quantize_onnx (int8 QDQ, cached), to_fp16, output parity
  parity.py     the accuracy floor every quantized model must pass against fp32 (agreement, SNR, top-1)
  qat.py        fake-quant fine-tuning in torch, exported to the same QDQ graph as PTQ
  run.py        the passes' orchestration: type choice by measurement, auto-exclusion, budgets, report

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
