"""Terminal view of a reparam stage's record, printed under the recipe table by `squeeze reparam`: per layer the
two measured latencies, the MACs, the fit error and what was decided."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

__all__ = ["reparam_view"]


def reparam_view(report: dict[str, Any]) -> Group:
    rec = next(s["record"] for s in report["stages"] if s["method"].startswith("reparam."))
    t = Table(title=f"{rec['method']} per layer on {report['target']} (standalone layers, lookup-table entries)")
    for col in ("layer", "original ms", "replacement ms", "speedup", "MACs", "fit error", "decision"):
        t.add_column(col, justify="left" if col in ("layer", "decision") else "right", overflow="fold")
    for row in rec["layers"]:
        fit = row["fit"] or {}
        t.add_row(row["name"], f"{row['original_ms']:.4f}", f"{row['replacement_ms']:.4f}", f"{row['speedup']:.2f}x",
                  f"{row['original_macs'] / 1e6:.2f}M -> {row['replacement_macs'] / 1e6:.2f}M",
                  f"{fit['relative_error']:.3f}" if "relative_error" in fit else "—", row["reason"])
    parts: list[Any] = [t]
    if rec["skipped"]:
        parts.append(Text("not candidates: " + "; ".join(f"{n} ({why})" for n, why in rec["skipped"].items())))
    acc = rec["val_top1"]
    parts.append(Text("validation top-1: " + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items())))
    speedup = (report.get("latency") or {}).get("speedup")
    if speedup and speedup["high"] < 1:
        parts.append(Text(f"The whole model is slower than the original ({speedup['ratio']:.3f}x, 95% interval "
                          f"[{speedup['low']:.3f}, {speedup['high']:.3f}]) although each replaced layer was faster "
                          "standalone: the runtime fuses the original's layers better. Keep the original.",
                          style="bold red"))
    return Group(*parts)
