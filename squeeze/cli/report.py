"""`squeeze report DIR` and `squeeze report A B --out C`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from squeeze import api
from squeeze.cli.common import Force, handles_errors, out


@handles_errors
def report(
    results: List[Path] = typer.Argument(..., help="A result folder (with report.json), or two to compare."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                           help="Folder to write to (created): for one result, its own by default."),
    force: bool = Force,
) -> None:
    """Rebuild a result's figures and report.html from its report.json, or write compare.html of two results."""
    written = api.report(results, out_dir, force=force)
    out.print("written: " + ", ".join(map(str, written)), highlight=False, soft_wrap=True)
