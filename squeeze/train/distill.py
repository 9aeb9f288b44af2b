"""Losses for fine-tuning: cross-entropy, optionally mixed with knowledge distillation from a teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["distillation_loss"]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """(1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)).

    Logits are (B, K). Without a teacher this is the (label-smoothed) cross-entropy alone. The T^2 factor
    keeps the soft term's gradients at the same scale whatever the temperature (Hinton et al., 2015).
    """
    ce = F.cross_entropy(student_logits, targets, label_smoothing=label_smoothing)
    if teacher_logits is None:
        return ce
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits {tuple(student_logits.shape)} differ"
        )
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.detach() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * ce + alpha * (t * t) * kl
