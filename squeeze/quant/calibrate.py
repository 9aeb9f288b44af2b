"""Calibration data for static quantization: N samples of a data set, fed to ONNX Runtime's calibrators.

The samples come from the train split (never the test split the accuracy is reported on), picked with a
fixed seed, and are held as one array so that their content hash can key the calibration cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from squeeze.errors import DataError

__all__ = ["CalibrationMethodName", "CALIBRATION_METHODS", "CalibrationData", "calibration_data", "compute_ranges",
           "calibration_method"]

CalibrationMethodName = Literal["minmax", "entropy", "percentile"]
CALIBRATION_METHODS: tuple[str, ...] = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class CalibrationData:
    """Calibration inputs (N, C, H, W) float32, fed to the calibrator `batch_size` samples at a time."""

    inputs: np.ndarray = field(repr=False)
    source: str  # where the samples came from, for the report
    batch_size: int = 32

    @property
    def n(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def fingerprint(self) -> str:
        """Content hash of the samples: equal inputs calibrate to equal ranges."""
        h = hashlib.sha256(repr((self.inputs.shape, str(self.inputs.dtype), self.batch_size)).encode())
        h.update(np.ascontiguousarray(self.inputs).tobytes())
        return h.hexdigest()[:24]

    def batches(self) -> Iterator[np.ndarray]:
        for start in range(0, self.n, self.batch_size):
            yield self.inputs[start:start + self.batch_size]

    def reader(self, input_name: str):
        """An `onnxruntime.quantization.CalibrationDataReader` over the samples, bound to `input_name`."""
        from onnxruntime.quantization import CalibrationDataReader

        data = self

        class _Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._batches = data.batches()

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self._batches, None)
                return None if batch is None else {input_name: batch}

        return _Reader()

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "samples": self.n, "batch_size": self.batch_size, "sha256": self.fingerprint}


def calibration_data(bundle, samples: int = 256, *, seed: int = 0, batch_size: int = 32) -> CalibrationData:
    """`samples` images of `bundle`'s train split (all of it when smaller), picked with `seed`."""
    if samples < 1:
        raise DataError(f"--samples {samples}: calibration needs at least one sample.", "Pass --samples 256.")
    train = bundle.train
    picks = np.sort(np.random.default_rng(seed).permutation(len(train))[:samples])
    inputs = np.stack([np.asarray(train[int(i)][0], dtype=np.float32) for i in picks])  # (N, C, H, W)
    return CalibrationData(inputs, f"{bundle.spec} train split, {len(picks)} of {len(train)} samples (seed {seed})",
                           batch_size)


# Entropy: 512 histogram bins searched for the 128-bin clip with the least KL divergence (TensorRT uses
# 2048, 4x the candidates at 16x the time; ORT's defaults, 128 and 128, leave one candidate: the full
# min-max range). Percentile: 99.999%.
# Ranges are asymmetric for every method: ORT's percentile default is symmetric, which wastes half of a
# uint8 range on non-negative (post-ReLU) tensors.
_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "minmax": {"symmetric": False},
    "entropy": {"symmetric": False, "num_bins": 512, "num_quantized_bins": 128},
    "percentile": {"symmetric": False, "num_bins": 2048, "percentile": 99.999},
}


def compute_ranges(model_path: Path, calibration: CalibrationData, method: CalibrationMethodName, input_name: str,
                   out_path: Path) -> None:
    """Calibrate every quantizable tensor of the model at `model_path`; write ORT's calibration cache file."""
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    enum = calibration_method(method)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        calibrator = create_calibrator(
            Path(model_path), sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"), calibrate_method=enum,
            extra_options=_METHOD_OPTIONS[method],
        )
        calibrator.collect_data(calibration.reader(input_name))
        staged = Path(tmp) / "ranges.json"
        save_tensors_data(calibrator.compute_data(), staged)
        os.replace(staged, out_path)  # a concurrent reader never sees half a file


def calibration_method(method: CalibrationMethodName):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[method]
