"""How image pixels become model inputs: the typed spec behind `--normalize` / `--resize`.

Kept free of torch so recipe validation stays light; squeeze.data applies it. A spec may be partial (what
the user gave, or what a checkpoint recorded); `over` layers one on another and squeeze.data fills the
rest with the data source's defaults, so the spec a run used is always complete and recorded.

`--normalize` forms (pixels are in [0, 1] first; then `(x - mean) / std` per channel):
  data                      the train split's own per-channel mean and std (the default for digits, folders)
  imagenet                  ImageNet's constants (luma-weighted for one grey channel)
  none                      raw [0, 1] pixels (the default for `package.module:function` data)
  MEAN,STD                  one mean and one std for every channel, e.g. 0.5,0.5
  M1,M2,M3:S1,S2,S3         per-channel means, a colon, per-channel stds (a single value also works: 0.5:0.5)
`--resize` (digits and folder images to the model's H x W): bilinear (default), bicubic (both
antialiased, as PIL resizes), nearest, or none (images must already have the model's size).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from squeeze.errors import DataError

__all__ = ["Preprocessing", "NORMALIZE_FORMS", "RESIZE_MODES", "parse_normalize", "parse_resize", "from_flags"]

NormalizeMode = Literal["data", "imagenet", "none", "values"]
ResizeMode = Literal["bilinear", "bicubic", "nearest", "none"]
RESIZE_MODES: tuple[str, ...] = ResizeMode.__args__
NORMALIZE_FORMS = ("data (the train split's mean/std), imagenet, none (raw [0, 1] pixels), MEAN,STD for all "
                   "channels (e.g. 0.5,0.5), or per channel M1,M2,M3:S1,S2,S3")
_NAMED = ("data", "imagenet", "none")
_NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"


class Preprocessing(BaseModel):
    """normalize + mean/std (the values, once resolved; given for "values") + resize; None: not decided here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    normalize: NormalizeMode | None = None
    mean: tuple[float, ...] | None = None  # per channel, of [0, 1] pixels
    std: tuple[float, ...] | None = Field(None, description="per channel, positive")
    resize: ResizeMode | None = None

    @model_validator(mode="after")
    def _values_complete(self):
        if self.normalize == "values" and (self.mean is None or self.std is None):
            raise ValueError("normalize `values` needs both mean and std")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std {self.std} must be positive")
        if (self.mean is None) != (self.std is None) or (self.mean and len(self.mean) != len(self.std)):
            raise ValueError("mean and std need the same number of values")
        return self

    def over(self, base: Preprocessing | None) -> Preprocessing:
        """This spec where it decides, `base` elsewhere; normalize and its mean/std travel together."""
        if base is None:
            return self
        fields = base.model_dump()
        if self.normalize is not None:
            fields.update(normalize=self.normalize, mean=self.mean, std=self.std)
        if self.resize is not None:
            fields["resize"] = self.resize
        return Preprocessing(**fields)

    @property
    def given(self) -> bool:
        return self.normalize is not None or self.resize is not None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def describe(self) -> str:
        """One line for the terminal, e.g. `normalize data (mean 0.3077, std 0.4137), resize bilinear`."""
        values = ""
        if self.mean is not None:
            values = f" (mean {_fmt(self.mean)}, std {_fmt(self.std)})"
        return f"normalize {self.normalize or 'default'}{values}, resize {self.resize or 'default'}"


def _fmt(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def parse_normalize(text: str, flag: str = "--normalize") -> Preprocessing:
    """A `--normalize` value (see the module docstring) -> a spec deciding normalize (and mean/std)."""
    choice = text.strip().lower()
    if choice in _NAMED:
        return Preprocessing(normalize=choice)
    if ":" in choice:
        parts = choice.split(":")
        groups = [part.split(",") for part in parts] if len(parts) == 2 else []
    else:
        groups = [[value] for value in choice.split(",")] if choice.count(",") == 1 else []
    if len(groups) != 2 or not all(re.fullmatch(_NUMBER, v) for group in groups for v in group):
        raise DataError(f"{flag} `{text}` is not a normalization.", f"Accepted forms: {NORMALIZE_FORMS}.")
    mean, std = (tuple(float(v) for v in group) for group in groups)
    if len(mean) != len(std) and 1 not in (len(mean), len(std)):
        raise DataError(f"{flag} `{text}` has {len(mean)} means but {len(std)} stds.",
                        "Give as many stds as means (one per channel), or one value for all channels.")
    if any(s <= 0 for s in std):
        raise DataError(f"{flag} `{text}`: std must be positive.", f"Accepted forms: {NORMALIZE_FORMS}.")
    width = max(len(mean), len(std))
    return Preprocessing(normalize="values", mean=_widen(mean, width), std=_widen(std, width))


def _widen(values: tuple[float, ...], width: int) -> tuple[float, ...]:
    return values * width if len(values) == 1 else values


def parse_resize(text: str, flag: str = "--resize") -> Preprocessing:
    choice = text.strip().lower()
    if choice not in RESIZE_MODES:
        raise DataError(f"{flag} `{text}` is not a resize mode.", f"Choose one of: {', '.join(RESIZE_MODES)}.")
    return Preprocessing(resize=choice)


def from_flags(normalize: str | None, resize: str | None) -> Preprocessing:
    """The spec that `--normalize` and `--resize` (each optional) decide."""
    spec = Preprocessing()
    if normalize is not None:
        spec = parse_normalize(normalize).over(spec)
    if resize is not None:
        spec = parse_resize(resize).over(spec)
    return spec
