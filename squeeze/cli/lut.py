"""`squeeze lut build|check MODEL --target T`: per-target latency lookup tables and their error."""

from __future__ import annotations

import json
from typing import Optional

import typer

from squeeze import api
from squeeze.cli.common import (BatchSizeOpt, InputShape, KeyOpt, RpcOpt, TargetOpt, TrackerOpt, TrustModel, Weights,
                                handles_errors, model_options, out, rpc_flags)

app = typer.Typer(help="Latency lookup tables: build them for a model's search space, check their error.",
                  no_args_is_help=True)


def _target(target: str, board: tuple) -> api.Target:
    """The target, with --rpc/--tracker/--key applied as they are for the whole command."""
    with rpc_flags(target, *board):
        return api.load_target(target)


@app.command("build")
@handles_errors
def build(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    target: str = TargetOpt,
    round_to: int = typer.Option(8, "--round-to", min=1, help="Width grid step."),
    single_layer: bool = typer.Option(False, "--single-layer", help="Also every width of each group alone (NetAdapt's first iteration; many more entries)."),
    batch_size: Optional[int] = BatchSizeOpt,
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    rpc: Optional[str] = RpcOpt,
    tracker: Optional[str] = TrackerOpt,
    key: Optional[str] = KeyOpt,
) -> None:
    """Measure the layer configurations a pruning search on MODEL meets; stored entries are reused."""
    loaded, table, result = api.lut_build(model, _target(target, (rpc, tracker, key)),
                                          model_options(input_shape, weights, trust_model), round_to, single_layer,
                                          batch_size)
    out.print(f"{result.configs} layer configurations for {loaded.name} on {table.target.name}: "
              f"{result.measured} measured now, {result.reused} reused from {table.path}")


@app.command("check")
@handles_errors
def check(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    target: str = TargetOpt,
    plans: int = typer.Option(10, "--plans", min=1, help="Random pruning plans to predict and measure."),
    fit_on: Optional[int] = typer.Option(None, "--fit-on", min=0, help="How many of the plans recalibrate the table "
                                         "(as a search does every few steps); the others check it [default: 3]."),
    seed: int = typer.Option(0, "--seed"),
    round_to: int = typer.Option(8, "--round-to", min=1),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    batch_size: Optional[int] = BatchSizeOpt,
    standalone: bool = typer.Option(False, "--standalone", help="Price every layer timed alone, not in context from "
                                    "the runtime's profile of the whole model (to see what in-context entries fix)."),
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    rpc: Optional[str] = RpcOpt,
    tracker: Optional[str] = TrackerOpt,
    key: Optional[str] = KeyOpt,
) -> None:
    """How wrong is `latency = sum of layers + constant` here? Random plans, predicted vs measured."""
    from squeeze.report.render import lut_check_view

    loaded, table, result = api.lut_check(model, _target(target, (rpc, tracker, key)),
                                          model_options(input_shape, weights, trust_model), plans, seed, round_to,
                                          batch_size, in_context=not standalone, fit_on=fit_on)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    out.print(lut_check_view(result, loaded.name, table.target.name))
