"""`squeeze reparam MODEL --method ghost|lego --target T --data D [--layers P] [--latency 0.6x] --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import pydantic
import typer

from squeeze import api
from squeeze.cli.common import (BatchSizeOpt, Force, InputShape, JsonReportOpt, LatencyMsOpt, LatencyOpt, MacsOpt, MinRepeatMsOpt,
                                NoCache, NormalizeOpt, RepeatOpt, ResizeOpt, SizeBytesOpt, TargetOpt, TrustModel,
                                WarmupOpt, Weights, check_json_out, handles_errors, model_options, parse_ratio,
                                show_report)
from squeeze.cli.method_flags import OPTION_HELP, MethodFlags
from squeeze.cli.prune import BUDGET_FLAGS

METHODS = MethodFlags("reparam", "re-parameterization", "reparam")
OTHER_FLAGS = {**BUDGET_FLAGS, "repeat": "--repeat", "warmup": "--warmup", "min_repeat_ms": "--min-repeat-ms",
               "batch_size": "--batch-size"}


@handles_errors
def reparam(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for model.pt, model.onnx and report.json (created)."),
    target: str = TargetOpt,
    method: str = METHODS.method_option("ghost", "re-parameterization"),
    data: Optional[str] = typer.Option(None, "--data", help="Fit, fine-tune and evaluation data: digits, fashion-mnist, a folder of class sub-folders, or package.module:function."),
    normalize: Optional[str] = NormalizeOpt,
    resize: Optional[str] = ResizeOpt,
    layers: Optional[str] = METHODS.flag("layers", "--layers", "Comma-separated glob patterns of the Conv2d layers to consider (default: all with groups=1 but the stem)"),
    replace_all: Optional[bool] = METHODS.flag("force", "--replace-all", "Replace every candidate layer, faster on the target or not"),
    min_speedup: Optional[float] = METHODS.flag("min_speedup", "--min-speedup", "Least measured speedup of a layer for its replacement to be taken", min=0.0),
    ratio: Optional[int] = METHODS.flag("ratio", "--ratio", "Ghost: s, the primary conv computes ceil(n/s) channels", min=2),
    dw_size: Optional[int] = METHODS.flag("dw_size", "--dw-size", "Ghost: the cheap depthwise kernel d", min=1),
    splits: Optional[int] = METHODS.flag("splits", "--splits", "Lego: o, input channel fragments", min=1),
    lego_ratio: Optional[float] = METHODS.flag("lego_ratio", "--lego-ratio", "Lego: m = ratio x n lego filters"),
    fine_tune_epochs: Optional[int] = METHODS.flag("fine_tune.epochs", "--fine-tune-epochs", "Distillation fine-tune epochs after the fit", min=1),
    option: Optional[List[str]] = typer.Option(None, "--option", help=OPTION_HELP),
    latency: Optional[str] = LatencyOpt,
    latency_ms: Optional[float] = LatencyMsOpt,
    macs: Optional[str] = MacsOpt,
    size_bytes: Optional[int] = SizeBytesOpt,
    repeat: Optional[int] = RepeatOpt,
    warmup: Optional[int] = WarmupOpt,
    min_repeat_ms: Optional[float] = MinRepeatMsOpt,
    batch_size: Optional[int] = BatchSizeOpt,
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    no_cache: bool = NoCache,
    force: bool = Force,
    json_out: Optional[str] = JsonReportOpt,
) -> None:
    """Replace trained convs by Ghost or Lego modules where the target runs them faster, fitted then fine-tuned."""
    check_json_out(json_out)
    from squeeze.report.render import recipe_view
    from squeeze.report.reparam import reparam_view

    preprocessing = api.parse_preprocessing(normalize, resize)
    method_pass = METHODS.get(method)
    options, given = METHODS.options(method_pass, {
        "--layers": [p.strip() for p in layers.split(",") if p.strip()] if layers else None,
        "--replace-all": replace_all, "--min-speedup": min_speedup, "--ratio": ratio, "--dw-size": dw_size,
        "--splits": splits, "--lego-ratio": lego_ratio, "--fine-tune-epochs": fine_tune_epochs,
    }, option)
    try:
        report = api.reparam(model, out_dir, method=method, target=target, latency=parse_ratio(latency, "--latency"),
                             latency_ms=latency_ms, macs=parse_ratio(macs, "--macs"), size_bytes=size_bytes,
                             data=data, options=options, preprocessing=preprocessing,
                             model_options=model_options(input_shape, weights, trust_model),
                             measure={"repeat": repeat, "warmup": warmup, "min_repeat_ms": min_repeat_ms,
                                       "batch_size": batch_size},
                             use_cache=not no_cache, force=force)
    except pydantic.ValidationError as exc:
        raise METHODS.invalid(exc, method_pass, {**given, **OTHER_FLAGS}) from None
    show_report(report, json_out, recipe_view(report), reparam_view(report))
