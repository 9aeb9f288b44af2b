"""`train_classifier`: training from scratch, as a preset of the one fine-tune loop."""

from __future__ import annotations

from torch import nn
from torch.utils.data import Dataset

from squeeze.train.config import FineTuneConfig
from squeeze.train.evaluation import EvalResult, evaluate
from squeeze.train.finetune import FineTuneResult, fine_tune

__all__ = ["EvalResult", "train_classifier", "evaluate"]


def train_classifier(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: bool | str = False,
) -> FineTuneResult:
    """Train in place with AdamW, a cosine decay over all steps and cross-entropy; leaves eval mode.

    Deterministic for a given seed on a given machine, and leaves the caller's RNG state untouched
    (see `fine_tune`). `progress` as fine_tune's (a string labels the bar).
    """
    config = FineTuneConfig(
        optimizer="adamw", lr=lr, epochs=epochs, batch_size=batch_size, weight_decay=weight_decay, seed=seed
    )
    return fine_tune(model, dataset, config, progress=progress)
