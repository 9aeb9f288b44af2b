"""How to fine-tune, as a typed config that recipes can carry. Imports no torch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["FineTuneConfig", "ProxyConfig"]


class FineTuneConfig(BaseModel):
    """Optimizer, schedule, budget and losses of one fine-tune (or distillation) run.

    The budget is `epochs` or `iterations` (optimizer steps), never both; with neither, one epoch.
    The learning rate warms up linearly over `warmup_iterations`, then follows a cosine from `lr`
    down to `min_lr` at the last step.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0, description="peak learning rate, reached after the warm-up")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the last step (floor of the cosine)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only")
    nesterov: bool = Field(False, description="SGD only; needs momentum > 0")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW only")
    weight_decay: float = Field(1e-4, ge=0)
    epochs: int | None = Field(None, ge=1)
    iterations: int | None = Field(None, ge=1, description="optimizer steps")
    warmup_iterations: int = Field(0, ge=0)
    batch_size: int = Field(64, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    distill_alpha: float = Field(
        0.5, ge=0, le=1, description="with a teacher: weight of the distillation term; cross-entropy gets 1 - alpha"
    )
    distill_temperature: float = Field(4.0, gt=0, description="softens teacher and student logits for the KL term")
    grad_clip_norm: float | None = Field(None, gt=0)
    seed: int = 0
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")

    @model_validator(mode="before")
    @classmethod
    def _default_budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and "epochs" not in data and "iterations" not in data:
            return {**data, "epochs": 1}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> FineTuneConfig:
        if (self.epochs is None) == (self.iterations is None):
            raise ValueError(
                f"give the budget as epochs or iterations, exactly one (got epochs={self.epochs}, "
                f"iterations={self.iterations})"
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError("nesterov needs optimizer sgd with momentum > 0")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is above lr {self.lr}")
        if self.iterations is not None and self.warmup_iterations >= self.iterations:
            raise ValueError(
                f"warmup_iterations {self.warmup_iterations} leaves no steps of the {self.iterations} iterations"
            )
        return self


class ProxyConfig(BaseModel):
    """A cheaper evaluation of a search's candidates (EcoNAS): fewer held-out samples, fewer short fine-tune
    steps, smaller inputs, and optionally the best few promoted to the full evaluation. Safe only where it keeps
    the candidates' ranking: `squeeze proxy check` measures that (Spearman's rho against the full setting)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eval_fraction: float = Field(1.0, gt=0, le=1, description="share of the held-out samples a candidate is scored on")
    iterations_fraction: float = Field(1.0, gt=0, le=1, description="share of the short-term fine-tune steps")
    resolution: float = Field(1.0, gt=0, le=1, description="input side scale (models with global pooling)")
    promote: int = Field(0, ge=0, description="hierarchical: the top k by the proxy finish the full fine-tune "
                                              "and are scored on every held-out sample")

    @property
    def is_full(self) -> bool:
        return self.eval_fraction == self.iterations_fraction == self.resolution == 1

    def label(self) -> str:
        if self.is_full:
            return "full"
        parts = [f"eval {self.eval_fraction:.0%}"] if self.eval_fraction < 1 else []
        if self.iterations_fraction < 1:
            parts.append(f"steps {self.iterations_fraction:.0%}")
        if self.resolution < 1:
            parts.append(f"resolution x{self.resolution:g}")
        if self.promote:
            parts.append(f"top {self.promote} promoted")
        return ", ".join(parts)
