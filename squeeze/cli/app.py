"""The `squeeze` Typer application."""

from __future__ import annotations

import logging
import os

import typer
from rich.logging import RichHandler

from squeeze import api
from squeeze.cli import bench, info, listing, lut, proxy, prune, quantize, reparam, report, run, targets
from squeeze.cli.common import err, state

# What every command's exit status means: set by handles_errors (squeeze/cli/common.py) from the error's
# `exit_code`, by the commands that give a verdict, and by the Ctrl-C handler (squeeze/cli/__init__.py).
EXIT_CODES = {
    0: "done (a gate that passed)",
    1: "a verdict against the result (the gate failed, the result misses its budget, the quantized or "
       "re-parameterized model is not faster, no quantized model is within the accuracy floor, a target check "
       "failed)",
    2: "bad input or environment (the message says which and how to fix it)",
    3: "an internal error (a bug: --debug shows the traceback)",
    130: "interrupted",
}

app = typer.Typer(
    name="squeeze",
    help="Hardware-aware model compression, proven by measuring the exported model on the target.",
    epilog="Exit codes:\n\n" + "\n\n".join(f"{code}: {meaning}" for code, meaning in EXIT_CODES.items()),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"squeeze {api.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress (bars or lines) and no log lines on stderr: "
                               "only results, warnings and errors (squeeze --quiet prune ...)."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    state["debug"] = debug or bool(os.environ.get("SQUEEZE_DEBUG"))
    state["quiet"] = quiet
    # Searches report progress through the "squeeze" loggers; show it on stderr (once per process).
    logger = logging.getLogger("squeeze")
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if not logger.handlers:
        logger.addHandler(RichHandler(console=err, show_path=False))


app.command("info")(info.info)
app.command("bench")(bench.bench)
app.command("prune")(prune.prune)
app.command("quantize")(quantize.quantize)
app.command("reparam")(reparam.reparam)
app.command("run")(run.run)
app.command("validate")(run.validate)
app.command("list")(listing.list_)
app.command("report")(report.report)
app.add_typer(targets.app, name="targets")
app.add_typer(lut.app, name="lut")
app.add_typer(proxy.app, name="proxy")

