"""`squeeze prune MODEL --target T --method netadapt --latency 0.5x --data digits --out DIR`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from squeeze import api
from squeeze.cli.common import (Force, InputShape, KeyOpt, NoCache, NormalizeOpt, ResizeOpt, RpcOpt, TargetOpt,
                                TrackerOpt, TrustModel, Weights, handles_errors, out, parse_fraction, preprocessing_flags,
                                rpc_flags)
from squeeze.errors import SqueezeError
from squeeze.shapes import parse_input_shape



def _methods() -> list[str]:
    """The registered `prune.*` passes (plugins included): a new one needs no edit here."""
    from squeeze.methods import list_passes

    return [p.name.removeprefix("prune.") for p in list_passes() if p.name.startswith("prune.")]


RATIO_HINT = "Write it as 0.5x, 0.5 or 50% of the original."


def parse_ratio(text: str, flag: str) -> float:
    """'0.5x' / '0.5' / '50%' -> 0.5, in (0, 1]."""
    value = parse_fraction(text, flag, "ratio", RATIO_HINT)
    if not 0 < value <= 1:
        raise SqueezeError(f"{flag} `{text}` is not a ratio in (0, 1]: pruning makes models smaller.", RATIO_HINT)
    return value


@handles_errors
def prune(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for model.pt, model.onnx and report.json (created)."),
    target: str = TargetOpt,
    method: str = typer.Option("netadapt", "--method", "-m", help="A registered pruning search: netadapt, uniform or a plugin's (squeeze list methods: prune.*)."),
    latency: Optional[str] = typer.Option(None, "--latency", help="Latency budget as a ratio of the original's measured latency (0.5x)."),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="Latency budget in milliseconds."),
    macs: Optional[str] = typer.Option(None, "--macs", help="MACs budget as a ratio of the original (0.5x)."),
    size_bytes: Optional[int] = typer.Option(None, "--size-bytes", help="Model size budget in bytes (fp32 weights)."),
    data: Optional[str] = typer.Option(None, "--data", help="digits, a folder of class sub-folders, or package.module:function. Without data: latency-only pruning (no fine-tune, no accuracy)."),
    normalize: Optional[str] = NormalizeOpt,
    resize: Optional[str] = ResizeOpt,
    importance: str = typer.Option("l1", "--importance", help="l1, l2, bn_scale, taylor or a plugin's (squeeze list importances)."),
    round_to: int = typer.Option(8, "--round-to", min=1, help="Widths are multiples of this."),
    latency_source: str = typer.Option("auto", "--latency-source", help="auto, table, measured or table+recalibrate."),
    select: str = typer.Option("accuracy", "--select", help="netadapt: accuracy or accuracy_per_latency."),
    short_term_iters: int = typer.Option(100, "--short-term-iters", min=1, help="netadapt: fine-tune steps per proposal."),
    long_term_epochs: int = typer.Option(10, "--long-term-epochs", min=1, help="Fine-tune epochs after the search."),
    distill: bool = typer.Option(False, "--distill", help="Distil the long-term fine-tune from the unpruned model."),
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    no_cache: bool = NoCache,
    force: bool = Force,
    rpc: Optional[str] = RpcOpt,
    tracker: Optional[str] = TrackerOpt,
    key: Optional[str] = KeyOpt,
) -> None:
    """Prune channels until a budget is met on the target, measured; writes the pruned model and a report."""
    import pydantic

    from squeeze.report.render import recipe_view

    from squeeze.prune.importance import get_importance

    get_importance(importance)  # an unknown criterion fails before any model is loaded
    preprocessing = preprocessing_flags(normalize, resize)
    if method not in _methods():
        raise SqueezeError(f"Unknown pruning method `{method}`.", f"Choose one of: {', '.join(_methods())}.")
    if not any(v is not None for v in (latency, latency_ms, macs, size_bytes)):
        raise SqueezeError("No budget given.", "Pass one of --latency 0.5x, --latency-ms 12, --macs 0.5x, --size-bytes N.")
    try:
        recipe = _recipe(method, target, data, latency, latency_ms, macs, size_bytes, importance, round_to,
                         latency_source, select, short_term_iters, long_term_epochs, distill)
    except pydantic.ValidationError as exc:
        bad = "; ".join(f"{_FLAGS.get(str(e['loc'][-1]), e['loc'][-1])} `{e['input']}`: {e['msg']}" for e in exc.errors())
        raise SqueezeError(f"Invalid option value ({bad}).", "See `squeeze prune --help` for the accepted values.") from None
    opts = api.ModelOptions(parse_input_shape(input_shape), weights, trust_model)
    with rpc_flags(target, rpc, tracker, key):
        report = api.run_recipe(recipe, model, out_dir, opts, preprocessing=preprocessing, use_cache=not no_cache,
                                force=force)
    out.print(recipe_view(report))


# Schema field -> the flag a user typed, for error messages.
_FLAGS = {"latency_ratio": "--latency", "latency_ms": "--latency-ms", "macs_ratio": "--macs", "size_bytes": "--size-bytes",
          "select": "--select", "latency_source": "--latency-source", "round_to": "--round-to"}


def _recipe(method, target, data, latency, latency_ms, macs, size_bytes, importance, round_to, latency_source, select,
            short_term_iters, long_term_epochs, distill):
    """The one-stage recipe `squeeze prune` runs (so `squeeze run` accepts the same as a stage)."""
    from squeeze.recipe import Budget, Recipe, Stage

    budget = Budget(latency_ratio=parse_ratio(latency, "--latency") if latency else None, latency_ms=latency_ms,
                    macs_ratio=parse_ratio(macs, "--macs") if macs else None, size_bytes=size_bytes)
    options = {"importance": importance, "round_to": round_to, "latency_source": latency_source, "distill": distill,
               "long_term": {"optimizer": "sgd", "lr": 0.01, "epochs": long_term_epochs}}
    from squeeze.methods import get_pass

    # Flags a method's options do not have (netadapt's --select on uniform, say) do not reach it.
    accepted = get_pass(f"prune.{method}").Options.model_fields
    extra = {"select": select, "short_term": {"optimizer": "sgd", "lr": 0.001, "iterations": short_term_iters}}
    options |= {k: v for k, v in extra.items() if k in accepted}
    recipe = Recipe(name=f"prune-{method}", target=target, budget=budget, data=data,
                    stages=[Stage(method=f"prune.{method}", options=options)])
    for stage in recipe.stages:
        stage.typed_options()  # option errors before any model is loaded
    return recipe
