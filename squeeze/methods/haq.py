"""`quant.haq`: HAQ mixed precision searched by a DDPG agent on costs measured on the target."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from squeeze.methods.base import ModelState, Pass, PassContext, register_pass
from squeeze.quant.parity import ParityFloor
from squeeze.train.config import FineTuneConfig

__all__ = ["HAQOptions", "HAQPass"]


class HAQOptions(ParityFloor):
    episodes: int = Field(100, ge=1, description="search episodes (HAQ: 600), each one policy fine-tuned briefly")
    warmup: int = Field(20, ge=0, description="first episodes with random actions that only fill the replay buffer")
    min_bits: int = Field(2, ge=2, le=32, description="lowest weight bits a layer may take (2..7 only under a size "
                          "budget: no kernel runs them)")
    max_bits: int = Field(32, ge=2, le=32, description="highest weight bits (32: a layer may stay fp32)")
    keep_first_last: bool = Field(True, description="first and last layers keep at least 8 bits (HAQ)")
    short_term: FineTuneConfig = Field(FineTuneConfig(optimizer="sgd", lr=0.001, iterations=20),
                                       description="fake-quant fine-tune of every episode's policy before its reward")
    long_term: FineTuneConfig = Field(FineTuneConfig(optimizer="sgd", lr=0.001, epochs=3),
                                      description="fake-quant fine-tune of the chosen policy before export")
    samples: int = Field(256, ge=1, description="calibration samples from the data's train split")
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    seed: int = 0

    @model_validator(mode="after")
    def _bits_ordered(self):
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits {self.min_bits} is above max_bits {self.max_bits}")
        return self


@register_pass
class HAQPass(Pass):
    name = "quant.haq"
    summary = "HAQ: per-layer precision (fp32/int8/4-bit; 2-7 bit under a size budget), DDPG on measured costs."
    Options = HAQOptions
    needs_budget = True

    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        from squeeze.quant.haq import haq_search

        model, artifact, result = haq_search(state.model, ctx.data, ctx.target, ctx.protocol, ctx.budget, self.options)
        state.model, state.artifact = model, artifact
        return state, result.to_json()
