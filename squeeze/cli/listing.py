"""`squeeze list methods|models|targets|recipes|runtimes|importances`: everything registered, by name."""

from __future__ import annotations

import typer
from rich.table import Table

from squeeze.cli.common import handles_errors, out
from squeeze.errors import SqueezeError

KINDS = ("methods", "models", "targets", "recipes", "runtimes", "importances")


def _rows(kind: str) -> list[tuple[str, str]]:
    if kind == "methods":
        from squeeze.methods import list_passes

        return [(p.name, p.summary) for p in list_passes()]
    if kind == "models":
        from squeeze.zoo_index import list_models

        return [(f"zoo:{e.name}", f"{e.description} (input {'x'.join(map(str, e.input_shape))})") for e in list_models()]
    if kind == "targets":
        from squeeze.target import list_targets

        return [(t.name, t.description) for t in list_targets()]
    if kind == "recipes":
        from squeeze.recipe import load_recipe
        from squeeze.resources import data_dir

        return [(p.stem, load_recipe(str(p)).description) for p in sorted(data_dir("recipes").glob("*.yaml"))]
    if kind == "importances":
        from squeeze.prune.importance import list_importances  # imports torch: the criteria score tensors

        return [(c.name, c.summary) for c in list_importances()]
    from squeeze.measure.runtimes import list_runtimes

    return [(r, "") for r in list_runtimes()]


@handles_errors
def list_(kind: str = typer.Argument("methods", help=f"One of: {', '.join(KINDS)}.")) -> None:
    """List what is registered: methods (passes), zoo models, targets, recipes, runtimes, importance criteria."""
    if kind not in KINDS:
        raise SqueezeError(f"Cannot list `{kind}`.", f"Choose one of: {', '.join(KINDS)}.")
    t = Table(title=kind)
    t.add_column("name")
    t.add_column("description")
    for name, desc in _rows(kind):
        t.add_row(name, desc)
    out.print(t)
