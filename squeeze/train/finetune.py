"""The one training loop: fine-tuning after compression, distillation, and training from scratch.

Deterministic for a given seed on a given machine: the shuffle order comes from a generator seeded
with `config.seed`, and the global RNG (dropout, augmentation) is seeded inside a fork, so the caller's
RNG state is left untouched.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from squeeze.errors import DataError, SqueezeError
from squeeze.progress import task as progress_task
from squeeze.train.config import FineTuneConfig
from squeeze.train.distill import distillation_loss
from squeeze.train.evaluation import EvalResult, _device_of, evaluate

__all__ = ["FineTuneResult", "fine_tune", "cosine_lr"]


@dataclass(frozen=True)
class FineTuneResult:
    iterations: int  # optimizer steps taken
    epochs: float  # passes over the train set: iterations / batches per epoch
    losses: list[float] = field(repr=False)  # training loss of each iteration (with the distillation term)
    lrs: list[float] = field(repr=False)  # learning rate of each iteration
    val: EvalResult | None  # on val_ds after the last step, when one was given
    seconds: float

    @property
    def val_top1(self) -> float | None:
        return None if self.val is None else self.val.top1

    def to_json(self) -> dict:
        return {
            "iterations": self.iterations,
            "epochs": self.epochs,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
            "val": None if self.val is None else self.val.to_json(),
            "seconds": self.seconds,
        }


def cosine_lr(step: int, *, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`.

    Linear warm-up to `peak` over the first `warmup` steps (never 0, so no step is wasted), then a
    half cosine from `peak` at step `warmup` towards `floor`, which it would reach at step `total`.
    """
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fine_tune(
    model: nn.Module,
    train_ds: Dataset,
    config: FineTuneConfig,
    *,
    teacher: nn.Module | None = None,
    val_ds: Dataset | None = None,
    progress: bool | str = True,
) -> FineTuneResult:
    """Train `model` in place on `train_ds` for the budget in `config`; leaves it in eval mode.

    With a `teacher`, the loss mixes cross-entropy with distillation from the teacher's logits (the
    teacher runs in eval mode without gradients, and gets its mode back afterwards). With `val_ds`, the
    result carries the final validation accuracy. Progress is reported through `squeeze.progress` unless
    `progress=False` (a string labels the bar).
    """
    if len(train_ds) == 0:
        raise DataError("The fine-tune data set is empty.", "Check the --data train split.")
    started = time.perf_counter()
    device = _device_of(model)
    loader = DataLoader(
        train_ds,
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
        num_workers=config.num_workers,
        # BatchNorm cannot train on a last batch of one sample; drop it only then.
        drop_last=len(train_ds) % config.batch_size == 1 and len(train_ds) > config.batch_size,
    )
    steps_per_epoch = len(loader)
    total = config.iterations if config.iterations is not None else config.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, config)
    teacher_was_training = teacher.training if teacher is not None else False
    losses: list[float] = []
    lrs: list[float] = []

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), _progress_bar(progress, total, teacher) as advance:
        torch.manual_seed(config.seed)
        model.train()
        if teacher is not None:
            teacher.eval()
        try:
            for step, (inputs, targets) in enumerate(_batches(loader, total)):
                lr = cosine_lr(step, total=total, warmup=config.warmup_iterations, peak=config.lr,
                               floor=config.min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = _step_loss(model, teacher, inputs.to(device), targets.to(device), config)
                value = float(loss.detach())
                if not math.isfinite(value):  # stop before a NaN gradient reaches the weights
                    raise SqueezeError(
                        f"The fine-tune loss became {value} at iteration {step + 1} of {total} (lr {lr:.3g}).",
                        "Lower the learning rate (lr), add warm-up (warmup_iterations) or clip gradients "
                        "(grad_clip_norm).",
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip_norm is not None:
                    nn.utils.clip_grad_norm_(params, config.grad_clip_norm)
                optimizer.step()
                losses.append(value)
                lrs.append(lr)
                advance(value, lr)
        finally:
            model.eval()
            if teacher is not None:
                teacher.train(teacher_was_training)
    val = evaluate(model, val_ds, batch_size=max(256, config.batch_size)) if val_ds is not None else None
    return FineTuneResult(
        iterations=len(losses),
        epochs=len(losses) / steps_per_epoch,
        losses=losses,
        lrs=lrs,
        val=val,
        seconds=time.perf_counter() - started,
    )


def _batches(loader: DataLoader, total: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly `total` batches, reshuffling at every pass over the data."""
    taken = 0
    while taken < total:
        for batch in loader:
            yield batch
            taken += 1
            if taken == total:
                return


def _make_optimizer(params: list[nn.Parameter], config: FineTuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
    )


def _step_loss(
    model: nn.Module, teacher: nn.Module | None, inputs: torch.Tensor, targets: torch.Tensor, config: FineTuneConfig
) -> torch.Tensor:
    logits = model(inputs)  # (B, K)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        if teacher_logits.shape != logits.shape:
            raise SqueezeError(
                f"The teacher outputs {tuple(teacher_logits.shape)} but the student {tuple(logits.shape)}; "
                "distillation needs the same classes.",
                "Distill from a teacher trained on the same labels.",
            )
    return distillation_loss(
        logits, teacher_logits, targets,
        alpha=config.distill_alpha, temperature=config.distill_temperature, label_smoothing=config.label_smoothing,
    )


@contextlib.contextmanager
def _progress_bar(enabled: bool | str, total: int, teacher: nn.Module | None) -> Iterator[Callable[[float, float], None]]:
    """Yields `advance(loss, lr)`: one iteration of a `squeeze.progress` task showing the loss and lr, or a no-op
    when disabled (a fine-tune run inside a larger step, which reports its own progress)."""
    if not enabled:
        yield lambda loss, lr: None
        return
    label = enabled if isinstance(enabled, str) else "distill" if teacher is not None else "fine-tune"
    with progress_task(label, total=total, unit="steps") as step:
        yield lambda loss, lr: step.advance(1, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
