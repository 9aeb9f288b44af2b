"""`squeeze prune MODEL --target T --method netadapt --latency 0.5x --data digits --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import pydantic
import typer

from squeeze import api
from squeeze.api import SqueezeError
from squeeze.cli.common import (BatchSizeOpt, Force, InputShape, JsonReportOpt, KeyOpt, LatencyMsOpt, LatencyOpt, MacsOpt, NoCache,
                                NormalizeOpt, ResizeOpt, Resume, RpcOpt, SizeBytesOpt, TargetOpt, TrackerOpt,
                                TrustModel, Weights, check_json_out, handles_errors, model_options, parse_ratio,
                                rpc_flags, show_report)
from squeeze.cli.method_flags import OPTION_HELP, MethodFlags

METHODS = MethodFlags("prune", "pruning method", "prune")
# Budget fields -> the flags that set them, for validation errors.
BUDGET_FLAGS = {"latency_ratio": "--latency", "latency_ms": "--latency-ms", "macs_ratio": "--macs",
                "size_bytes": "--size-bytes"}


@handles_errors
def prune(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for model.pt, model.onnx and report.json (created)."),
    target: str = TargetOpt,
    method: str = METHODS.method_option("netadapt", "pruning search"),
    latency: Optional[str] = LatencyOpt,
    latency_ms: Optional[float] = LatencyMsOpt,
    macs: Optional[str] = MacsOpt,
    size_bytes: Optional[int] = SizeBytesOpt,
    data: Optional[str] = typer.Option(None, "--data", help="digits, a folder of class sub-folders, or package.module:function. Without data: latency-only pruning (no fine-tune, no accuracy)."),
    normalize: Optional[str] = NormalizeOpt,
    resize: Optional[str] = ResizeOpt,
    importance: Optional[str] = METHODS.flag("importance", "--importance", "l1, l2, bn_scale, taylor or a plugin's (squeeze list importances)"),
    round_to: Optional[int] = METHODS.flag("round_to", "--round-to", "Widths are multiples of this", min=1),
    latency_source: Optional[str] = METHODS.flag("latency_source", "--latency-source", "auto, table, measured or table+recalibrate"),
    select: Optional[str] = METHODS.flag("select", "--select", "accuracy or accuracy_per_latency"),
    short_term_iters: Optional[int] = METHODS.flag("short_term.iterations", "--short-term-iters", "fine-tune steps per proposal", min=1),
    episodes: Optional[int] = METHODS.flag("episodes", "--episodes", "search episodes", min=1),
    long_term_epochs: Optional[int] = METHODS.flag("long_term.epochs", "--long-term-epochs", "Fine-tune epochs after the search", min=1),
    distill: Optional[bool] = METHODS.flag("distill", "--distill", "Distil the long-term fine-tune from the unpruned model"),
    workers: Optional[int] = METHODS.flag("workers", "--workers", "Fine-tune and evaluate candidates as Ray tasks on a local Ray of N CPUs (pip install 'squeeze\\[ray]')", min=1),
    ray_address: Optional[str] = METHODS.flag("ray_address", "--ray-address", "HOST:PORT of a running Ray cluster to evaluate candidates on"),
    option: Optional[List[str]] = typer.Option(None, "--option", help=OPTION_HELP),
    batch_size: Optional[int] = BatchSizeOpt,
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    no_cache: bool = NoCache,
    force: bool = Force,
    json_out: Optional[str] = JsonReportOpt,
    resume: bool = Resume,
    rpc: Optional[str] = RpcOpt,
    tracker: Optional[str] = TrackerOpt,
    key: Optional[str] = KeyOpt,
) -> None:
    """Prune channels until a budget is met on the target, measured; writes the pruned model and a report."""
    check_json_out(json_out)
    from squeeze.report.render import recipe_view

    preprocessing = api.parse_preprocessing(normalize, resize)
    method_pass = METHODS.get(method)
    if not any(v is not None for v in (latency, latency_ms, macs, size_bytes)):
        raise SqueezeError("No budget given.", "Pass one of --latency 0.5x, --latency-ms 12, --macs 0.5x, --size-bytes N.")
    options, given = METHODS.options(method_pass, {
        "--importance": importance, "--round-to": round_to, "--latency-source": latency_source, "--select": select,
        "--short-term-iters": short_term_iters, "--episodes": episodes, "--long-term-epochs": long_term_epochs, "--distill": distill,
        "--workers": workers, "--ray-address": ray_address,
    }, option)
    try:
        with rpc_flags(target, rpc, tracker, key):
            report = api.prune(model, out_dir, method=method, target=target, latency=parse_ratio(latency, "--latency"),
                               latency_ms=latency_ms, macs=parse_ratio(macs, "--macs"), size_bytes=size_bytes,
                               data=data, options=options, preprocessing=preprocessing,
                               model_options=model_options(input_shape, weights, trust_model),
                               measure={"batch_size": batch_size}, use_cache=not no_cache, force=force,
                               resume=resume)
    except pydantic.ValidationError as exc:
        raise METHODS.invalid(exc, method_pass, {**given, **BUDGET_FLAGS}) from None
    show_report(report, json_out, recipe_view(report))
