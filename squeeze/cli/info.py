"""`squeeze info MODEL`: params, MACs per layer, size."""

from __future__ import annotations

import json
from typing import Optional

import typer

from squeeze import api
from squeeze.cli.common import InputShape, TrustModel, Weights, handles_errors, model_options, out


@handles_errors
def info(
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show a model's parameters, MACs (per layer and total), size and layer table."""
    from squeeze.report.render import info_view

    summary = api.info(model, model_options(input_shape, weights, trust_model))
    if as_json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        out.print(info_view(summary))
