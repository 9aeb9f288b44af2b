"""What an export produces. Kept free of torch so measurement worker processes start light."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

__all__ = ["Parity", "OnnxArtifact", "compare_outputs"]


@dataclass(frozen=True)
class Parity:
    """An export's output vs its reference on the same seeded inputs (see `compare_outputs` for the rule)."""

    max_abs_err: float
    max_rel_err: float  # max |got - ref| / max |ref|: the error relative to the output's scale
    atol: float
    rtol: float
    batch_size: int
    passed: bool


def compare_outputs(got: np.ndarray, ref: np.ndarray, atol: float = 1e-4, rtol: float = 1e-3) -> Parity:
    """Passes when |got - ref| <= max(atol, rtol * max|ref|) + rtol * |ref| everywhere: every parity check
    (torch vs ONNX Runtime at export, TVM vs ONNX Runtime on the host); the defaults are the export's.

    allclose with its absolute term scaled to the output's range: float32 rounding in a deep net grows
    with the magnitude of what is summed, which the output's range reflects, not each element's own
    value; an element near zero among outputs of size 3 carries its neighbours' absolute error (an
    element-wise relative error there is meaningless). A wrong export is off by a sizeable fraction of
    the output's range, far above rtol of it. atol is the floor for outputs that are all near zero.
    """
    batch = got.shape[0] if got.ndim else 1
    if got.shape != ref.shape:
        return Parity(float("inf"), float("inf"), atol, rtol, batch, False)
    ref = ref.astype(np.float64)
    err = np.abs(got.astype(np.float64) - ref)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_err = float(err.max()) if err.size else 0.0
    passed = bool(np.all(err <= max(atol, rtol * scale) + rtol * np.abs(ref)))
    relative = max_err / scale if scale else (0.0 if max_err == 0 else float("inf"))
    return Parity(max_err, relative, atol, rtol, batch, passed)


@dataclass(frozen=True)
class OnnxArtifact:
    path: Path
    sha256: str  # of the file: what measurements are keyed by
    input_name: str
    input_shape: tuple[int, ...]  # batch 1; the batch axis is dynamic
    exporter: str
    parity: Parity | None  # None when the input already was ONNX

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d
