"""`squeeze quantize MODEL --target T --data D [--method int8|fp16|qat|haq] --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from squeeze import api
from squeeze.cli.common import (
    InputShape,
    Force,
    NoCache,
    NormalizeOpt,
    ResizeOpt,
    TargetOpt,
    TrustModel,
    Weights,
    handles_errors,
    out,
    parse_fraction,
    preprocessing_flags,
)
from squeeze.cli.prune import parse_ratio
from squeeze.errors import SqueezeError
from squeeze.shapes import parse_input_shape


def _pass_for(method: str):
    """The registered pass `quant.<method>`; an unknown method lists the registered quant.* ones."""
    from squeeze.methods import get_pass, list_passes

    names = [p.name.removeprefix("quant.") for p in list_passes() if p.name.startswith("quant.")]
    if method not in names:
        raise SqueezeError(f"Unknown quantization method `{method}`.", f"Choose one of: {', '.join(names)}.")
    return get_pass(f"quant.{method}")


def _options(method_pass, flags: dict[str, tuple[str, Any]]) -> dict[str, Any]:
    """Options the user gave (not None), checked against what the method's pass accepts."""
    accepted = method_pass.Options.model_fields
    options = {}
    for key, (flag, value) in flags.items():
        if value is None:
            continue
        if key not in accepted:
            raise SqueezeError(f"{flag} does not apply to --method {method_pass.name.removeprefix('quant.')}.",
                               f"Its options: {', '.join(accepted) or 'none'}.")
        options[key] = value
    return options


@handles_errors
def quantize(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for model.onnx and report.json (created)."),
    target: str = TargetOpt,
    data: Optional[str] = typer.Option(None, "--data", help="Calibration and evaluation data: digits, a folder of class sub-folders, or package.module:function."),
    normalize: Optional[str] = NormalizeOpt,
    resize: Optional[str] = ResizeOpt,
    method: str = typer.Option("int8", "--method", "-m", help="int8, fp16, qat or haq (squeeze list methods: quant.*)."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="minmax (default), entropy or percentile."),
    per_channel: Optional[bool] = typer.Option(None, "--per-channel/--per-tensor", help="Weight scales per output channel (default) or per tensor."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Calibration samples from the train split (default 256)."),
    activation_type: Optional[str] = typer.Option(None, "--activation-type", help="auto (default: measured on the target), uint8 or int8."),
    weight_type: Optional[str] = typer.Option(None, "--weight-type", help="auto (default: measured), int8 or uint8."),
    reduce_range: Optional[str] = typer.Option(None, "--reduce-range", help="7-bit int8 weights: auto (tried too where the CPU has no int8 dot product, VNNI), on or off."),
    min_agreement: Optional[str] = typer.Option(None, "--min-agreement", help="Accuracy floor: least top-1 agreement with fp32 on held-out images (default 99%)."),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", min=0.0, help="Accuracy floor: most top-1 points lost against fp32 (default 1)."),
    min_snr_db: Optional[float] = typer.Option(None, "--min-snr-db", help="Accuracy floor: least SNR of the logits against fp32 in dB (default: not checked)."),
    exclude: Optional[str] = typer.Option(None, "--exclude", help="Comma-separated torch layer names to leave in float."),
    auto_exclude: Optional[bool] = typer.Option(None, "--auto-exclude/--no-auto-exclude", help="When int8 is not faster, put the layers the per-layer profile blames back to float until it is (else fp32)."),
    qat_epochs: Optional[int] = typer.Option(None, "--qat-epochs", min=1, help="qat: fine-tune epochs (default 2)."),
    qat_lr: Optional[float] = typer.Option(None, "--qat-lr", help="qat: peak learning rate (default 0.001)."),
    activation_ranges: Optional[str] = typer.Option(None, "--activation-ranges", help="qat: learned (default) or calibrated."),
    episodes: Optional[int] = typer.Option(None, "--episodes", min=1, help="haq: search episodes (default 100)."),
    warmup_episodes: Optional[int] = typer.Option(None, "--warmup-episodes", min=0, help="haq: first episodes with random actions (default 20)."),
    min_bits: Optional[int] = typer.Option(None, "--min-bits", min=2, max=32, help="haq: fewest weight bits a layer may take (default 2; below 8 only under a size budget)."),
    max_bits: Optional[int] = typer.Option(None, "--max-bits", min=2, max=32, help="haq: most weight bits (default 32: a layer may stay fp32)."),
    latency: Optional[str] = typer.Option(None, "--latency", help="Latency budget as a ratio of the fp32 model's measured latency (0.6x)."),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="Latency budget in milliseconds."),
    size_bytes: Optional[int] = typer.Option(None, "--size-bytes", help="Model size budget in bytes."),
    repeat: Optional[int] = typer.Option(None, "--repeat", min=3, help="Timed samples per model (default: the target's)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", min=0),
    min_repeat_ms: Optional[float] = typer.Option(None, "--min-repeat-ms", min=0.0),
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    no_cache: bool = NoCache,
    force: bool = Force,
) -> None:
    """Quantize for the target, measured: the result is faster than fp32 or nothing is handed back."""
    import pydantic

    from squeeze.report.quant import quant_view
    from squeeze.recipe import Budget, MeasureOverrides, Recipe, Stage
    from squeeze.report.render import recipe_view
    from squeeze.target import load_target

    method_pass = _pass_for(method)
    preprocessing = preprocessing_flags(normalize, resize)
    if method in ("int8", "fp16", "qat"):
        from squeeze.quant.run import check_target

        check_target(method, load_target(target))
    if data is None and method != "fp16":
        from squeeze.quant.run import MissingCalibrationDataError

        raise MissingCalibrationDataError(
            f"--method {method} needs calibration data (--data): static quantization measures each activation's "
            "range on real samples, and the accuracy of the result is reported on held-out ones.",
            "Pass --data digits, a folder of class sub-folders, or package.module:function.")
    fine_tune = None
    if qat_epochs is not None or qat_lr is not None:
        fine_tune = {"optimizer": "sgd", "lr": qat_lr or 0.001, "epochs": qat_epochs or 2}
    options = _options(method_pass, {
        "calibration": ("--calibration", calibration), "per_channel": ("--per-channel/--per-tensor", per_channel),
        "samples": ("--samples", samples), "activation_type": ("--activation-type", activation_type),
        "weight_type": ("--weight-type", weight_type), "reduce_range": ("--reduce-range", reduce_range),
        "min_agreement": ("--min-agreement",
                          parse_fraction(min_agreement, "--min-agreement") if min_agreement else None),
        "max_accuracy_drop": ("--max-accuracy-drop", max_accuracy_drop), "min_snr_db": ("--min-snr-db", min_snr_db),
        "exclude": ("--exclude", [n.strip() for n in exclude.split(",") if n.strip()] if exclude else None),
        "auto_exclude": ("--auto-exclude", auto_exclude), "fine_tune": ("--qat-epochs/--qat-lr", fine_tune),
        "activation_ranges": ("--activation-ranges", activation_ranges),
        "episodes": ("--episodes", episodes), "warmup": ("--warmup-episodes", warmup_episodes),
        "min_bits": ("--min-bits", min_bits), "max_bits": ("--max-bits", max_bits),
    })
    budget = None
    if any(v is not None for v in (latency, latency_ms, size_bytes)):
        budget = Budget(latency_ratio=parse_ratio(latency, "--latency") if latency else None, latency_ms=latency_ms,
                        size_bytes=size_bytes)
    try:
        recipe = Recipe(name=f"quantize-{method}", target=target, budget=budget, data=data,
                        stages=[Stage(method=method_pass.name, options=options)],
                        measure=MeasureOverrides(repeat=repeat, warmup=warmup, min_repeat_ms=min_repeat_ms))
        recipe.stages[0].typed_options()  # option errors before any model is loaded
    except pydantic.ValidationError as exc:
        bad = "; ".join(f"{'.'.join(map(str, e['loc']))} `{e['input']}`: {e['msg']}" for e in exc.errors())
        raise SqueezeError(f"Invalid option value ({bad}).", "See `squeeze quantize --help` for the accepted values.") from None
    opts = api.ModelOptions(parse_input_shape(input_shape), weights, trust_model)
    report = api.run_recipe(recipe, model, out_dir, opts, preprocessing=preprocessing, use_cache=not no_cache,
                            force=force)
    out.print(recipe_view(report))
    out.print(quant_view(report))
