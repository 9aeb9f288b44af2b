"""Training, fine-tuning, distillation and evaluation shared by every compression method.

  config.py      FineTuneConfig: the typed settings recipes carry (imports no torch)
  finetune.py    fine_tune: the one training loop (SGD/AdamW, cosine with warm-up, KD, label smoothing)
  distill.py     the loss: cross-entropy mixed with knowledge distillation
  evaluation.py  evaluate / evaluate_onnx: top-1, top-5 and loss of a torch model or an ONNX file
  loop.py        train_classifier: training from scratch as a preset of fine_tune

Names are imported on first use, so `squeeze.train.config` stays torch-free.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from squeeze.train.config import FineTuneConfig
    from squeeze.train.distill import distillation_loss
    from squeeze.train.evaluation import EvalResult, evaluate, evaluate_onnx
    from squeeze.train.finetune import FineTuneResult, cosine_lr, fine_tune
    from squeeze.train.loop import train_classifier

_SOURCES = {
    "FineTuneConfig": "config",
    "FineTuneResult": "finetune",
    "fine_tune": "finetune",
    "cosine_lr": "finetune",
    "distillation_loss": "distill",
    "EvalResult": "evaluation",
    "evaluate": "evaluation",
    "evaluate_onnx": "evaluation",
    "train_classifier": "loop",
}

__all__ = [
    "FineTuneConfig",
    "FineTuneResult",
    "fine_tune",
    "cosine_lr",
    "distillation_loss",
    "EvalResult",
    "evaluate",
    "evaluate_onnx",
    "train_classifier",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'squeeze.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"squeeze.train.{source}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])
