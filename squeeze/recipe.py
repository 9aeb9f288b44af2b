"""Typed recipe schema and loading. Validation happens before any model is loaded and imports no torch.

A recipe is YAML:
    name: bench-host
    target: host-cpu            # optional; --target overrides
    budget: {latency_ratio: 0.5}    # what the final model must meet against the original
    data: digits                # or {spec: digits, normalize: "0.5,0.5", resize: bilinear}; --data overrides
    stages:
      - method: export.onnx
      - method: measure.latency
        options: {label: final}
    export: {exporter: dynamo}
    measure: {repeat: 30}

One budget for the whole recipe: a stage may declare its own share (`budget:` on the stage, its ratios of the
model the stage receives; `budget: null` for none); a stage without one gets what is left of the recipe's
(`remaining_budget`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from squeeze.errors import RecipeError, SqueezeError
from squeeze.methods import PassOptions, get_pass, list_passes
from squeeze.preprocessing import Preprocessing, from_flags, parse_normalize, parse_resize
from squeeze.target import Target
from squeeze.util.resources import data_dir
from squeeze.util.yamlio import format_validation_error, load_yaml_model

__all__ = ["Budget", "RATIOS", "remaining_budget", "Stage", "ExportOptions", "MeasureOverrides", "DataSection",
           "Recipe", "check_runtimes", "load_recipe", "resolve_recipe_path"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Budget(_Strict):
    latency_ms: float | None = Field(None, gt=0)
    latency_ratio: float | None = Field(None, gt=0, le=1, description="of the original model's measured latency")
    macs_ratio: float | None = Field(None, gt=0, le=1)
    size_bytes: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_at_least(self):
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("a budget needs at least one of latency_ms, latency_ratio, macs_ratio, size_bytes")
        return self


RATIOS = ("latency_ratio", "macs_ratio")  # the budget keys that are fractions of the original


def remaining_budget(budget: Budget, reached: dict[str, float]) -> Budget:
    """What is left of a recipe's budget for a stage that receives a model at `reached` (ratio key -> the
    received model's latency (measured) or MACs (counted) over the original's): each ratio becomes
    target / reached, capped at 1 (a budget already met asks for no more than the received model); absolute
    values (latency_ms, size_bytes) are what the final model must meet, so they pass unchanged."""
    left = {k: min(1.0, getattr(budget, k) / reached[k]) for k in RATIOS if getattr(budget, k) is not None}
    return budget.model_copy(update=left)


class Stage(_Strict):
    method: str
    options: dict[str, Any] = Field(default_factory=dict)
    budget: Budget | None = Field(None, description="this stage's share, its ratios of the model it receives; "
                                                    "null: none (default: what is left of the recipe's budget)")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        names = [p.name for p in list_passes()]
        if v not in names:
            raise ValueError(f"unknown method `{v}`; valid methods: {', '.join(names)}")
        return v

    def typed_options(self) -> PassOptions:
        return get_pass(self.method).Options.model_validate(self.options)

    @property
    def own_budget(self) -> bool:
        """`budget:` given on the stage (`budget: null` included): it does not share the recipe's."""
        return "budget" in self.model_fields_set


class ExportOptions(_Strict):
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    atol: float = Field(1e-4, ge=0)
    rtol: float = Field(1e-3, ge=0)


class MeasureOverrides(_Strict):
    warmup: int | None = Field(None, ge=0)
    repeat: int | None = Field(None, ge=3)
    min_repeat_ms: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)


class DataSection(_Strict):
    """`data:`: a --data spec, and how its pixels become model inputs (squeeze.preprocessing's forms)."""

    spec: str
    normalize: str | None = Field(None, description="data, imagenet, none, MEAN,STD or M1,M2,M3:S1,S2,S3")
    resize: str | None = Field(None, description="bilinear, bicubic, nearest or none")

    @model_validator(mode="before")
    @classmethod
    def _bare_spec(cls, value: Any) -> Any:
        return {"spec": value} if isinstance(value, str) else value  # `data: digits`

    @field_validator("normalize")
    @classmethod
    def _normalize_form(cls, v: str | None) -> str | None:
        return _checked(parse_normalize, v, "normalize")

    @field_validator("resize")
    @classmethod
    def _resize_mode(cls, v: str | None) -> str | None:
        return _checked(parse_resize, v, "resize")

    def preprocessing(self) -> Preprocessing:
        return from_flags(self.normalize, self.resize)


def _checked(parse, value: str | None, key: str) -> str | None:
    """A value the CLI parser accepts; its message (naming the accepted forms) as a validation error."""
    if value is not None:
        try:
            parse(value, key)
        except SqueezeError as exc:
            raise ValueError(exc.message) from None
    return value


class Recipe(_Strict):
    name: str
    description: str = ""
    target: str | None = None
    budget: Budget | None = None
    data: DataSection | None = Field(None, description="data for stages that fine-tune or evaluate (--data overrides)")
    stages: list[Stage] = Field(min_length=1)
    export: ExportOptions = ExportOptions()
    measure: MeasureOverrides = MeasureOverrides()

    @model_validator(mode="after")
    def _budget_where_needed(self):
        needing = [s.method for s in self.stages if get_pass(s.method).needs_budget and s.budget is None
                   and (s.own_budget or self.budget is None)]
        if needing:
            raise ValueError(f"{', '.join(needing)} need a `budget:` (e.g. budget: {{latency_ratio: 0.5}})")
        return self

    def budgets(self) -> list[Budget]:
        return [b for b in (self.budget, *(s.budget for s in self.stages)) if b is not None]


def check_runtimes(recipe: Recipe, target: Target) -> None:
    """Refuse a stage whose exports the target's runtime cannot run, before any stage runs (a quantization
    after a long pruning search would otherwise fail only when its turn comes)."""
    for i, stage in enumerate(recipe.stages):
        runtimes = get_pass(stage.method).runtimes
        if runtimes is not None and target.runtime not in runtimes:
            raise RecipeError(
                f"Recipe `{recipe.name}` stage {i} (`{stage.method}`) writes models for {', '.join(runtimes)}; "
                f"target `{target.name}` runs `{target.runtime}`.",
                "Use a target with that runtime (squeeze list targets), or drop the stage.")


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = data_dir("recipes") / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    known = ", ".join(p.stem for p in sorted(data_dir("recipes").glob("*.yaml")))
    raise RecipeError(f"No recipe file `{name_or_path}`.", f"Pass a YAML path or a shipped recipe: {known}.")


def load_recipe(name_or_path: str) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    recipe = load_yaml_model(path, Recipe, RecipeError, "recipe")
    root = yaml.compose(path.read_text())
    for i, stage in enumerate(recipe.stages):
        try:
            stage.typed_options()
        except pydantic.ValidationError as exc:
            prefixed = pydantic.ValidationError.from_exception_data(
                exc.title,
                [{**e, "loc": ("stages", i, "options", *e["loc"])} for e in exc.errors(include_url=False)],
            )
            raise RecipeError(
                f"Invalid recipe {format_validation_error(prefixed, str(path), root)} "
                f"(options of `{stage.method}`: {', '.join(get_pass(stage.method).Options.model_fields) or 'none'}).",
                f"Fix the value(s) named above in {path.name}.",
            ) from exc
    return recipe
