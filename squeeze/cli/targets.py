"""`squeeze targets list|show|check`."""

from __future__ import annotations

import json
from typing import Optional

import typer
import yaml

from squeeze import api
from squeeze.cli.common import KeyOpt, RpcOpt, TrackerOpt, err, handles_errors, out, rpc_flags

app = typer.Typer(help="List and inspect measurement targets.", no_args_is_help=True)


@app.command("list")
@handles_errors
def list_() -> None:
    """List the shipped targets."""
    from squeeze.report.render import targets_view

    out.print(targets_view(api.list_targets()))


@app.command("show")
@handles_errors
def show(name: str = typer.Argument(..., help="Target name or YAML file.")) -> None:
    """Show a target's full definition (the format for your own target files)."""
    t = api.load_target(name)
    out.print(f"# {t.source}", style="dim", highlight=False)
    out.print(yaml.safe_dump(t.model_dump(mode="json"), sort_keys=False), highlight=False, end="")


@app.command("check")
@handles_errors
def check(
    name: str = typer.Argument(..., help="Target name or YAML file."),
    rpc: Optional[str] = RpcOpt,
    tracker: Optional[str] = TrackerOpt,
    key: Optional[str] = KeyOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the steps as JSON instead of a table."),
) -> None:
    """Run a tiny model through the target's whole path and say what works (exit 1 if a step fails)."""
    from rich.markup import escape

    from squeeze.report.render import target_check_view

    with rpc_flags(name, rpc, tracker, key):
        tgt = api.load_target(name)
        report = api.check_target(tgt)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        if not report.passed:
            raise typer.Exit(1)
        return
    out.print(target_check_view(report, tgt.name))
    if report.passed:
        out.print(f"[green]PASS[/]: every applicable step works on `{tgt.name}`.")
        return
    err.print(f"[bold red]FAIL[/] at `{report.failure.name}`: {escape(report.failure.detail)}", highlight=False,
              soft_wrap=True)
    raise typer.Exit(1)
