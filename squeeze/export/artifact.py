"""What an export produces. Kept free of torch so measurement worker processes start light."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["Parity", "OnnxArtifact"]


@dataclass(frozen=True)
class Parity:
    """ORT vs torch on the same seeded inputs; passes when |ort - torch| <= atol + rtol * |torch| everywhere."""

    max_abs_err: float
    max_rel_err: float
    atol: float
    rtol: float
    batch_size: int
    passed: bool


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
