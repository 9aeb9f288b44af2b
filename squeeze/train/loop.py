"""Supervised training and evaluation of a classifier, shared by every method that fine-tunes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["EvalResult", "train_classifier", "evaluate"]


@dataclass(frozen=True)
class EvalResult:
    top1: float  # fraction correct, 0..1
    loss: float  # mean cross-entropy per sample
    n: int  # samples seen


def train_classifier(
    model: nn.Module,
    dataset: Dataset,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> None:
    """Train in place with AdamW, a cosine decay over all steps and cross-entropy; leaves eval mode.

    Deterministic for a given seed on a given machine: the shuffle order comes from its own generator
    and the global RNG (dropout) is seeded inside a fork, so the caller's RNG state is left untouched.
    """
    shuffle_rng = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=shuffle_rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * len(loader))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for inputs, targets in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(inputs), targets)
                loss.backward()
                optimizer.step()
                schedule.step()
    model.eval()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> EvalResult:
    """Top-1 accuracy and mean cross-entropy over the whole dataset, in eval mode."""
    model.eval()
    loss_sum = 0.0
    correct = 0
    n = 0
    for inputs, targets in DataLoader(dataset, batch_size=batch_size):
        logits = model(inputs)  # (B, num_classes)
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct += int((logits.argmax(dim=1) == targets).sum())
        n += len(targets)
    if n == 0:
        raise ValueError("evaluate() got an empty dataset")
    return EvalResult(top1=correct / n, loss=loss_sum / n, n=n)
