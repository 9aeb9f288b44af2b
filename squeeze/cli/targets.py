"""`squeeze targets list|show|check`."""

from __future__ import annotations

import json
from typing import Optional

import typer
import yaml

from squeeze.cli.common import KeyOpt, RpcOpt, TrackerOpt, err, handles_errors, out, rpc_flags

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
    from rich.table import Table

    from squeeze.measure.check import check_target
    from squeeze.target import load_target

    with rpc_flags(name, rpc, tracker, key):
        tgt = load_target(name)
        report = check_target(tgt)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        if not report.passed:
            raise typer.Exit(1)
        return
    t = Table(title=f"targets check {tgt.name}")
    for col in ("step", "result", "detail"):
        t.add_column(col, overflow="fold")
    styles = {"pass": "green", "fail": "bold red", "skip": "dim"}
    for s in report.steps:
        # A failure's full message (with its fix) follows the table; its first sentence is enough here.
        detail = s.detail.split(". ")[0] + "." if s.status == "fail" else s.detail
        t.add_row(s.name, f"[{styles[s.status]}]{s.status.upper()}[/]", escape(detail))
    out.print(t)
    if report.passed:
        out.print(f"[green]PASS[/]: every applicable step works on `{tgt.name}`.")
        return
    err.print(f"[bold red]FAIL[/] at `{report.failure.name}`: {escape(report.failure.detail)}", highlight=False,
              soft_wrap=True)
    raise typer.Exit(1)
