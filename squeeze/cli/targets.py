"""`squeeze targets list|show`."""

from __future__ import annotations

import typer
import yaml

from squeeze.cli.common import handles_errors, out

app = typer.Typer(help="List and inspect measurement targets.", no_args_is_help=True)


@app.command("list")
@handles_errors
def list_() -> None:
    """List the shipped targets."""
    from squeeze.report.render import targets_view
    from squeeze.target import list_targets

    out.print(targets_view(list_targets()))


@app.command("show")
@handles_errors
def show(name: str = typer.Argument(..., help="Target name or YAML file.")) -> None:
    """Show a target's full definition (the format for your own target files)."""
    from squeeze.target import load_target

    t = load_target(name)
    out.print(f"# {t.source}", style="dim", highlight=False)
    out.print(yaml.safe_dump(t.model_dump(mode="json"), sort_keys=False), highlight=False, end="")
