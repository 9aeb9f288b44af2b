"""`squeeze run RECIPE MODEL` and `squeeze validate RECIPE`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from squeeze import api
from squeeze.cli.common import (Force, InputShape, JsonReportOpt, NoCache, NormalizeOpt, ResizeOpt, Resume,
                                TrustModel, Weights, check_json_out, handles_errors, model_options, out, show_report)


@handles_errors
def run(
    recipe: str = typer.Argument(..., help="Recipe YAML file or shipped recipe name (squeeze list recipes)."),
    model: str = typer.Argument(..., help="Model file, zoo:NAME or package.module:factory."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for model.onnx and report.json (created)."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Overrides the recipe's target."),
    data: Optional[str] = typer.Option(None, "--data", help="Data for stages that fine-tune or evaluate (overrides the recipe's)."),
    normalize: Optional[str] = NormalizeOpt,
    resize: Optional[str] = ResizeOpt,
    input_shape: Optional[str] = InputShape,
    weights: Optional[str] = Weights,
    trust_model: bool = TrustModel,
    no_cache: bool = NoCache,
    force: bool = Force,
    json_out: Optional[str] = JsonReportOpt,
    resume: bool = Resume,
) -> None:
    """Run a recipe's stages on a model and write the results."""
    check_json_out(json_out)
    from squeeze.report.render import recipe_view

    report = api.run_recipe(recipe, model, out_dir, model_options(input_shape, weights, trust_model),
                            target_name=target, data_spec=data, preprocessing=api.parse_preprocessing(normalize, resize),
                            use_cache=not no_cache, force=force, resume=resume)
    show_report(report, json_out, recipe_view(report))


@handles_errors
def validate(recipe: str = typer.Argument(..., help="Recipe YAML file or shipped recipe name.")) -> None:
    """Check a recipe without loading any model."""
    r = api.validate_recipe(recipe)
    out.print(f"[green]ok[/]: recipe `{r.name}`, {len(r.stages)} stage(s): {', '.join(s.method for s in r.stages)}")
