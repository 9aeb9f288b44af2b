"""Typed recipe schema and loading. Validation happens before any model is loaded and imports no torch.

A recipe is YAML:
    name: bench-host
    target: host-cpu            # optional; --target overrides
    budget: {latency_ratio: 0.5}
    data: digits                # or {spec: digits, normalize: "0.5,0.5", resize: bilinear}; --data overrides
    stages:
      - method: export.onnx
      - method: measure.latency
        options: {label: final}
    export: {exporter: dynamo}
    measure: {repeat: 30}
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
from squeeze.util.resources import data_dir
from squeeze.util.yamlio import format_validation_error, load_yaml_model

__all__ = ["Budget", "Stage", "ExportOptions", "MeasureOverrides", "DataSection", "Recipe", "load_recipe",
           "resolve_recipe_path"]


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


class Stage(_Strict):
    method: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        names = [p.name for p in list_passes()]
        if v not in names:
            raise ValueError(f"unknown method `{v}`; valid methods: {', '.join(names)}")
        return v

    def typed_options(self) -> PassOptions:
        return get_pass(self.method).Options.model_validate(self.options)


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
        needing = [s.method for s in self.stages if get_pass(s.method).needs_budget]
        if needing and self.budget is None:
            raise ValueError(f"{', '.join(needing)} need a `budget:` (e.g. budget: {{latency_ratio: 0.5}})")
        return self


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
