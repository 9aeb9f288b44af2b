"""`squeeze quantize MODEL --target T --data D [--method int8|fp16|qat|haq|...] --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import pydantic
import typer

from squeeze import api
from squeeze.cli.common import (BatchSizeOpt, Force, InputShape, JsonReportOpt, LatencyMsOpt, LatencyOpt, MinRepeatMsOpt, NoCache,
                                NormalizeOpt, RepeatOpt, ResizeOpt, SizeBytesOpt, TargetOpt, TrustModel, WarmupOpt,
                                Weights, check_json_out, handles_errors, model_options, parse_fraction,
                                parse_ratio, show_report)
from squeeze.cli.method_flags import OPTION_HELP, MethodFlags

METHODS = MethodFlags("quant", "quantization method", "quantize")
# Budget and measurement fields -> the flags that set them, for validation errors.
OTHER_FLAGS = {"latency_ratio": "--latency", "latency_ms": "--latency-ms", "size_bytes": "--size-bytes",
               "repeat": "--repeat", "warmup": "--warmup", "min_repeat_ms": "--min-repeat-ms",
               "batch_size": "--batch-size"}


@handles_errors
def quantize(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for model.onnx and report.json (created)."),
    target: str = TargetOpt,
    data: Optional[str] = typer.Option(None, "--data", help="Calibration and evaluation data: digits, a folder of class sub-folders, or package.module:function."),
    normalize: Optional[str] = NormalizeOpt,
    resize: Optional[str] = ResizeOpt,
    method: str = METHODS.method_option("int8", "quantization method"),
    calibration: Optional[str] = METHODS.flag("calibration", "--calibration", "minmax, entropy or percentile"),
    per_channel: Optional[bool] = METHODS.flag("per_channel", "--per-channel/--per-tensor", "Weight scales per output channel or per tensor"),
    samples: Optional[int] = METHODS.flag("samples", "--samples", "Calibration samples from the train split"),
    activation_type: Optional[str] = METHODS.flag("activation_type", "--activation-type", "auto (measured on the target), uint8 or int8"),
    weight_type: Optional[str] = METHODS.flag("weight_type", "--weight-type", "auto (measured), int8 or uint8"),
    reduce_range: Optional[str] = METHODS.flag("reduce_range", "--reduce-range", "7-bit int8 weights: auto (tried too where the CPU has no int8 dot product, VNNI), on or off"),
    min_agreement: Optional[str] = METHODS.flag("min_agreement", "--min-agreement", "Accuracy floor: least top-1 agreement with fp32 on held-out images (99% or 0.99)"),
    max_accuracy_drop: Optional[float] = METHODS.flag("max_accuracy_drop", "--max-accuracy-drop", "Accuracy floor: most top-1 points lost against fp32", min=0.0),
    min_snr_db: Optional[float] = METHODS.flag("min_snr_db", "--min-snr-db", "Accuracy floor: least SNR of the logits against fp32 in dB (not given: not checked)"),
    exclude: Optional[str] = METHODS.flag("exclude", "--exclude", "Comma-separated torch layer names to leave in float"),
    auto_exclude: Optional[bool] = METHODS.flag("auto_exclude", "--auto-exclude/--no-auto-exclude", "When int8 is not faster, put the layers the per-layer profile blames back to float until it is (else fp32)"),
    qat_epochs: Optional[int] = METHODS.flag("fine_tune.epochs", "--qat-epochs", "fine-tune epochs", min=1),
    qat_lr: Optional[float] = METHODS.flag("fine_tune.lr", "--qat-lr", "peak learning rate"),
    activation_ranges: Optional[str] = METHODS.flag("activation_ranges", "--activation-ranges", "learned or calibrated"),
    episodes: Optional[int] = METHODS.flag("episodes", "--episodes", "search episodes", min=1),
    warmup_episodes: Optional[int] = METHODS.flag("warmup", "--warmup-episodes", "first episodes with random actions", min=0),
    min_bits: Optional[int] = METHODS.flag("min_bits", "--min-bits", "fewest weight bits a layer may take (below 8 only under a size budget)", min=2, max=32),
    max_bits: Optional[int] = METHODS.flag("max_bits", "--max-bits", "most weight bits (32: a layer may stay fp32)", min=2, max=32),
    workers: Optional[int] = METHODS.flag("workers", "--workers", "Score the warm-up episodes' policies as Ray tasks on a local Ray of N CPUs (pip install 'squeeze\\[ray]')", min=1),
    ray_address: Optional[str] = METHODS.flag("ray_address", "--ray-address", "HOST:PORT of a running Ray cluster to score the warm-up policies on"),
    option: Optional[List[str]] = typer.Option(None, "--option", help=OPTION_HELP),
    latency: Optional[str] = LatencyOpt,
    latency_ms: Optional[float] = LatencyMsOpt,
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
    """Quantize for the target, measured: the result is faster than fp32 or nothing is handed back."""
    check_json_out(json_out)
    from squeeze.report.quant import quant_view
    from squeeze.report.render import recipe_view

    method_pass = METHODS.get(method)
    preprocessing = api.parse_preprocessing(normalize, resize)
    options, given = METHODS.options(method_pass, {
        "--calibration": calibration, "--per-channel/--per-tensor": per_channel, "--samples": samples,
        "--activation-type": activation_type, "--weight-type": weight_type, "--reduce-range": reduce_range,
        "--min-agreement": parse_fraction(min_agreement, "--min-agreement") if min_agreement else None,
        "--max-accuracy-drop": max_accuracy_drop, "--min-snr-db": min_snr_db,
        "--exclude": [n.strip() for n in exclude.split(",") if n.strip()] if exclude else None,
        "--auto-exclude/--no-auto-exclude": auto_exclude, "--qat-epochs": qat_epochs, "--qat-lr": qat_lr,
        "--activation-ranges": activation_ranges, "--episodes": episodes, "--warmup-episodes": warmup_episodes,
        "--min-bits": min_bits, "--max-bits": max_bits, "--workers": workers, "--ray-address": ray_address,
    }, option)
    try:
        report = api.quantize(model, out_dir, method=method, target=target, latency=parse_ratio(latency, "--latency"),
                              latency_ms=latency_ms, size_bytes=size_bytes, data=data, options=options,
                              preprocessing=preprocessing, model_options=model_options(input_shape, weights, trust_model),
                              measure={"repeat": repeat, "warmup": warmup, "min_repeat_ms": min_repeat_ms,
                                       "batch_size": batch_size},
                              use_cache=not no_cache, force=force)
    except pydantic.ValidationError as exc:
        raise METHODS.invalid(exc, method_pass, {**given, **OTHER_FLAGS}) from None
    show_report(report, json_out, recipe_view(report), quant_view(report))
