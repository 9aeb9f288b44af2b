"""`squeeze lut build|check MODEL --target T`: per-target latency lookup tables and their error."""

from __future__ import annotations

import json
from typing import Optional

import typer
from rich.table import Table

from squeeze import api
from squeeze.cli.common import (InputShape, KeyOpt, RpcOpt, TargetOpt, TrackerOpt, TrustModel, Weights, handles_errors,
                                out, rpc_flags)
from squeeze.shapes import parse_input_shape

app = typer.Typer(help="Latency lookup tables: build them for a model's search space, check their error.",
                  no_args_is_help=True)


def _setup(model: str, target: str, input_shape, weights, trust_model, board: tuple):
    from squeeze.measure.lut import LatencyTable
    from squeeze.target import load_target

    with rpc_flags(target, *board):
        tgt = load_target(target)
    api.get_runtime_check(tgt)
    loaded = api.ModelOptions(parse_input_shape(input_shape), weights, trust_model).load(model)
    return loaded, LatencyTable(tgt)


@app.command("build")
@handles_errors
def build(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    target: str = TargetOpt,
    round_to: int = typer.Option(8, "--round-to", min=1, help="Width grid step."),
    single_layer: bool = typer.Option(False, "--single-layer", help="Also every width of each group alone (NetAdapt's first iteration; many more entries)."),
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    rpc: Optional[str] = RpcOpt,
    tracker: Optional[str] = TrackerOpt,
    key: Optional[str] = KeyOpt,
) -> None:
    """Measure the layer configurations a pruning search on MODEL meets; stored entries are reused."""
    from rich.progress import Progress

    from squeeze.prune.tables import build_table, search_space_configs

    loaded, table = _setup(model, target, input_shape, weights, trust_model, (rpc, tracker, key))
    total = len(search_space_configs(loaded, round_to, single_layer))
    with Progress(console=out, transient=True) as bar:
        task = bar.add_task("measuring layers", total=total)
        result = build_table(loaded, table, round_to, single_layer, progress=lambda n: bar.advance(task, n))
    out.print(f"{result.configs} layer configurations for {loaded.name} on {table.target.name}: "
              f"{result.measured} measured now, {result.reused} reused from {table.path}")


@app.command("check")
@handles_errors
def check(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    target: str = TargetOpt,
    plans: int = typer.Option(10, "--plans", min=1, help="Random pruning plans to predict and measure."),
    seed: int = typer.Option(0, "--seed"),
    round_to: int = typer.Option(8, "--round-to", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    rpc: Optional[str] = RpcOpt,
    tracker: Optional[str] = TrackerOpt,
    key: Optional[str] = KeyOpt,
) -> None:
    """How wrong is `latency = sum of layers + constant` here? Random plans, predicted vs measured."""
    from squeeze.prune.tables import check_table

    loaded, table = _setup(model, target, input_shape, weights, trust_model, (rpc, tracker, key))
    result = check_table(loaded, table, plans, seed, round_to)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    t = Table(title=f"lookup table vs measurement: {loaded.name} on {table.target.name}")
    for col in ("plan", "MACs", "measured ms", "table ms", "error", "recalibrated ms", "error "):
        t.add_column(col, justify="right")
    for r in result.rows:
        recal = ("(fit)", "") if r.recalibrated_ms is None else (f"{r.recalibrated_ms:.3f}", f"{r.recalibrated_error_pct:+.1f}%")
        t.add_row(str(r.plan), f"{r.macs / 1e6:.1f}M", f"{r.measured_ms:.3f}", f"{r.predicted_ms:.3f}",
                  f"{r.error_pct:+.1f}%", *recal)
    out.print(t)
    (med, p90), (rmed, rp90) = result.summary(), result.summary(recalibrated=True)
    out.print(f"table alone: median |error| {med:.1f}%, p90 {p90:.1f}%; after fitting the constant on plan 0: median "
              f"{rmed:.1f}%, p90 {rp90:.1f}% (original {result.reference_ms:.3f} ms; measured = interleaved with the "
              "original, scaled by its latency)")
