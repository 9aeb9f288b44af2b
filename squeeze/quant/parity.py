"""Accuracy is part of every quantization choice: a quantized model is compared with fp32 on held-out
inputs (top-1 agreement and SNR of the logits; top-1 accuracy against the labels) and refused below a
declared floor.

Why a floor and not a reading: int8 accuracy depends on the CPU. ONNX Runtime's uint8 x int8 convolution
kernels on x86 without VNNI add products pairwise in 16 bits and can saturate (a small residual CNN read
51% top-1 agreement on an AVX2 machine, 100% on an AVX-512 VNNI one). A speed measurement cannot see
that; only a parity check on the machine itself can.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from squeeze.errors import SqueezeError
from squeeze.export.artifact import OnnxArtifact
from squeeze.export.ort import run_batched

__all__ = ["ParityFloor", "ParityCheck", "ParitySource", "OrtParity", "ParityError",
           "refuse_below_floor"]


class ParityFloor(BaseModel):
    """The least a quantized model must keep of the fp32 model's behaviour to be written at all. A base of
    the quantization passes' options (and so as strict as PassOptions)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_agreement: float = Field(0.99, ge=0, le=1, description="least top-1 agreement with fp32 on held-out "
                                 "inputs (fraction)")
    max_accuracy_drop: float = Field(1.0, ge=0, description="most top-1 accuracy points lost against fp32 "
                                     "(with labels)")
    min_snr_db: float | None = Field(None, description="least SNR of the logits against fp32, in dB (none: "
                                     "not checked)")
    parity_samples: int = Field(2000, ge=1, description="held-out images the floor is checked on (test split, "
                                "else val)")

    def floor_json(self) -> dict:
        return {"min_agreement": self.min_agreement, "max_accuracy_drop_pt": self.max_accuracy_drop,
                "min_snr_db": self.min_snr_db, "samples": self.parity_samples}


@dataclass(frozen=True)
class ParityCheck:
    """A model's logits against fp32's on the same held-out inputs, both through ONNX Runtime."""

    split: str
    n: int
    top1_agreement: float  # fraction of inputs with the same arg-max class
    snr_db: float  # 10 log10(sum ref^2 / sum (out - ref)^2); inf when equal
    max_abs_err: float
    reference_top1: float | None = None  # fp32 accuracy (fraction) when the inputs have labels
    top1: float | None = None

    @property
    def accuracy_drop_pt(self) -> float | None:
        return None if self.top1 is None else 100 * (self.reference_top1 - self.top1)

    def failures(self, floor: ParityFloor) -> list[str]:
        """What falls below `floor`, each with the measured value and the limit; empty when it passes."""
        found = []
        if self.top1_agreement < floor.min_agreement:
            found.append(f"top-1 agreement {100 * self.top1_agreement:.1f}% < {100 * floor.min_agreement:.1f}%")
        drop = self.accuracy_drop_pt
        if drop is not None and drop > floor.max_accuracy_drop:
            found.append(f"accuracy {100 * self.top1:.2f}% is {drop:.2f} pt below fp32's "
                         f"{100 * self.reference_top1:.2f}% (at most {floor.max_accuracy_drop:g} pt)")
        if floor.min_snr_db is not None and self.snr_db < floor.min_snr_db:
            found.append(f"SNR {self.snr_db:.1f} dB < {floor.min_snr_db:g} dB")
        return found

    def to_json(self, floor: ParityFloor | None = None) -> dict:
        d = {**asdict(self), "accuracy_drop_pt": self.accuracy_drop_pt}
        if floor is not None:
            d["below_floor"] = self.failures(floor)
        return d


ParitySource = Callable[[OnnxArtifact], ParityCheck]


class OrtParity:
    """Parity of artifacts against `reference` through ONNX Runtime on the first `samples` held-out images;
    the reference's outputs are computed once, each artifact's once (by content hash)."""

    def __init__(self, reference: OnnxArtifact, data, samples: int) -> None:
        self.split, ds = data.held_out()
        n = min(len(ds), samples)
        items = [ds[i] for i in range(n)]
        self.inputs = np.stack([np.asarray(x, dtype=np.float32) for x, _ in items])
        self.labels = np.asarray([int(y) for _, y in items], dtype=np.int64)
        self.reference = run_batched(reference, self.inputs)
        self._memo: dict[str, ParityCheck] = {}

    def _top1(self, logits: np.ndarray) -> float:
        return float(np.mean(logits.argmax(axis=1) == self.labels))

    def __call__(self, artifact: OnnxArtifact) -> ParityCheck:
        from squeeze.quant.ptq import compare_outputs

        if artifact.sha256 not in self._memo:
            outputs = run_batched(artifact, self.inputs)
            p = compare_outputs(self.reference, outputs)
            self._memo[artifact.sha256] = ParityCheck(self.split, p.n, p.top1_agreement, p.snr_db, p.max_abs_err,
                                                      self._top1(self.reference), self._top1(outputs))
        return self._memo[artifact.sha256]


class ParityError(SqueezeError):
    """No quantized model keeps the fp32 model's accuracy within the floor: nothing is written."""

    exit_code = 1


_INT8_FIX = ("Leave the sensitive layers in float (--exclude a,b), try --calibration entropy or percentile, "
             "--activation-type uint8 --weight-type uint8, or 7-bit weights (--reduce-range on); or lower the floor "
             "(--min-agreement, --max-accuracy-drop) if that loss is acceptable.")


def refuse_below_floor(subject: str, checks: list[tuple[str, ParityCheck]], floor: ParityFloor,
                       cpu_note: str = "", fix: str = _INT8_FIX) -> None:
    """Raise ParityError when every (label, check) is below `floor`: `subject` (e.g. "No int8 model keeps
    the fp32 model's accuracy within the floor"), then each check's shortfall."""
    failing = [(label, check.failures(floor)) for label, check in checks]
    if not failing or any(not f for _, f in failing):
        return
    if len(failing) == 1:
        listed = ", ".join(failing[0][1])
    else:
        listed = "; ".join(f"{label}: {', '.join(f)}" for label, f in failing)
    n, split = checks[0][1].n, checks[0][1].split
    raise ParityError(
        f"{subject} on {n} {split} images: {listed}. Nothing was written.{(' ' + cpu_note) if cpu_note else ''}",
        fix)
