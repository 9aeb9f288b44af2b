"""`squeeze list methods|models|targets|recipes|runtimes|importances`: everything registered, by name."""

from __future__ import annotations

import typer

from squeeze import api
from squeeze.cli.common import handles_errors, out


@handles_errors
def list_(kind: str = typer.Argument("methods", help=f"One of: {', '.join(api.CATALOGS)}.")) -> None:
    """List what is registered: methods (passes), zoo models, targets, recipes, runtimes, importance criteria."""
    from squeeze.report.render import catalog_view

    out.print(catalog_view(kind, api.catalog(kind)))
