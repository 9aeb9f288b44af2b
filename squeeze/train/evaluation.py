"""Accuracy of a classifier on a dataset: of a torch model, or of the exported ONNX file itself.

Both paths share one tally, so the number reported for an artifact is computed exactly as for the torch
model it came from, only with ONNX Runtime producing the logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from squeeze.errors import DataError, ModelLoadError
from squeeze.export.artifact import OnnxArtifact
from squeeze.export.ort import open_session

__all__ = ["EvalResult", "evaluate", "evaluate_onnx"]

# ONNX input element types squeeze feeds (quantized models keep a float input).
_ORT_INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class EvalResult:
    top1: float  # fraction correct, 0..1
    loss: float  # mean cross-entropy per sample
    n: int  # samples seen
    top5: float | None = None  # fraction with the label among the 5 highest logits; None below 5 classes

    def to_json(self) -> dict:
        return asdict(self)


class _Tally:
    """Running sums over batches of (B, K) logits and (B,) labels."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.top1 = 0
        self.top5 = 0
        self.n = 0
        self.num_classes = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if logits.ndim != 2:
            raise DataError(
                f"The model returned shape {tuple(logits.shape)}; evaluation needs (batch, classes) logits.",
                "Evaluate a classifier, or a model whose output is one logit per class.",
            )
        self.num_classes = logits.shape[1]
        targets = torch.as_tensor(targets).long()
        if len(targets) and (int(targets.max()) >= self.num_classes or int(targets.min()) < 0):
            raise DataError(
                f"The data has label {int(targets.max())} but the model predicts {self.num_classes} classes "
                f"(labels 0..{self.num_classes - 1}).",
                "Check that the data set belongs to this model (class count, label order).",
            )
        logits = logits.float()
        self.loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        self.top1 += int((logits.argmax(dim=1) == targets).sum())
        top = logits.topk(min(5, self.num_classes), dim=1).indices  # (B, k)
        self.top5 += int((top == targets[:, None]).any(dim=1).sum())
        self.n += len(targets)

    def result(self) -> EvalResult:
        if self.n == 0:
            raise DataError("Evaluation got an empty dataset.", "Check the --data split sizes.")
        top5 = self.top5 / self.n if self.num_classes >= 5 else None
        return EvalResult(top1=self.top1 / self.n, loss=self.loss_sum / self.n, n=self.n, top5=top5)


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> EvalResult:
    """Top-1 (and top-5) accuracy and mean cross-entropy over the whole dataset, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    device = _device_of(model)
    tally = _Tally()
    model.eval()
    try:
        for inputs, targets in DataLoader(dataset, batch_size=batch_size):
            tally.add(model(inputs.to(device)).cpu(), targets)  # (B, num_classes)
    finally:
        model.train(was_training)
    return tally.result()


def evaluate_onnx(artifact: OnnxArtifact | str | Path, dataset: Dataset, batch_size: int = 256) -> EvalResult:
    """`evaluate` for an ONNX file (an `OnnxArtifact` or a path), run by ONNX Runtime on the CPU.

    A model exported with a fixed batch size is fed batches of exactly that size (the last one padded).
    """
    path = Path(getattr(artifact, "path", artifact))
    if not path.is_file():
        raise ModelLoadError(f"No ONNX model at {path}.", "Export the model first, or check the path.")
    session = open_session(path)
    model_input = session.get_inputs()[0]
    dtype = _ORT_INPUT_DTYPES.get(model_input.type, np.float32)
    fixed_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None

    tally = _Tally()
    for inputs, targets in DataLoader(dataset, batch_size=fixed_batch or batch_size):
        batch = inputs.numpy().astype(dtype, copy=False)
        if fixed_batch and len(batch) < fixed_batch:
            padding = np.zeros((fixed_batch - len(batch), *batch.shape[1:]), dtype)
            batch = np.concatenate([batch, padding])
        logits = session.run(None, {model_input.name: batch})[0][: len(targets)]  # (B, num_classes)
        tally.add(torch.from_numpy(np.asarray(logits)), targets)
    return tally.result()
