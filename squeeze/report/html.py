"""A result as one self-contained HTML page (report.html), and two results side by side.

Everything is in the file: the figures as base64 data: URIs, the style inline; no script, nothing fetched from
the network, so it opens offline and can be attached anywhere. Every string taken from the report is escaped.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

from squeeze.errors import SqueezeError
from squeeze.report import figures
from squeeze.report.render import fmt_bytes, fmt_count

__all__ = ["REPORT_HTML", "COMPARE_HTML", "read_report", "layer_tables", "report_html", "compare_html",
           "report_files"]

REPORT_HTML, COMPARE_HTML = "report.html", "compare.html"
# What every report.json written by squeeze holds; the rest (accuracy, search records) is optional.
REQUIRED_KEYS = ("recipe", "model", "target", "original", "final", "latency", "stages")

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1700px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f2f2f2; }
.kv td { text-align: left; } .warning { color: #a15c00; font-weight: bold; }
.side { display: grid; grid-template-columns: 1fr 1fr; gap: 1.5em; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def read_report(folder: Path) -> dict[str, Any]:
    """`folder`/report.json as written by prune, quantize or run; a SqueezeError says what is wrong with it."""
    folder = Path(folder)
    hint = "Name a result folder: the --out of `squeeze prune`, `squeeze quantize` or `squeeze run`."
    if not folder.is_dir():
        raise SqueezeError(f"{folder} is not a folder{'' if folder.exists() else ' (it does not exist)'}.", hint)
    path = folder / "report.json"
    if not path.is_file():
        raise SqueezeError(f"{folder} holds no report.json, so it is not a squeeze result.", hint)
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise SqueezeError(f"{path} cannot be read ({type(exc).__name__}: {exc}).", hint) from None
    except json.JSONDecodeError as exc:
        raise SqueezeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}): the file "
                           "is damaged or was cut short.", "Re-run the command that wrote it.") from None
    missing = [k for k in REQUIRED_KEYS if k not in report] if isinstance(report, dict) else list(REQUIRED_KEYS)
    if missing:
        raise SqueezeError(f"{path} is not a squeeze report: it lacks {', '.join(missing)}.", hint)
    return report


def _e(value: Any) -> str:
    return escape(str(value))


def _table(head: list[str] | None, rows: list[list[Any]], cls: str = "") -> str:
    """Every cell is escaped here, once. `head` None: rows only."""
    thead = "" if head is None else "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table{f" class={cls!r}" if cls else ""}>{thead}<tbody>{body}</tbody></table>'


def _ms(m: dict[str, Any] | None, key: str = "median_ms") -> str:
    return f"{m['stats'][key]:.3f}" if m else "—"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _summary_rows(report: dict[str, Any]) -> list[list[str]]:
    lat, acc = report["latency"], report.get("accuracy")
    rows = []
    for key in ("original", "final"):
        s = report[key]
        rows.append([key, fmt_count(s.get("params")), fmt_count(s.get("macs")), fmt_bytes(s.get("onnx_bytes") or 0),
                     _ms(lat.get(key)), _ms(lat.get(key), "p90_ms"), _pct(acc[f"{key}_top1"]) if acc else "—"])
    return rows


def _summary_head(report: dict[str, Any]) -> list[str]:
    acc = report.get("accuracy")
    return ["", "params", "MACs", "model.onnx", "latency ms (median)", "p90 ms",
            f"top-1 ({acc['split']}, ONNX)" if acc else "top-1"]


def _headline(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of what the result came to: speedup, MACs reduction, accuracy change, warnings."""
    lines = []
    sp = report["latency"].get("speedup")
    if sp:
        lines.append(("measured speedup", f"{sp['ratio']:.3f}x [{sp['low']:.3f}, {sp['high']:.3f}] "
                                          f"({100 * sp['confidence']:.0f}% CI, interleaved)"))
    if report.get("macs_reduction"):
        lines.append(("MACs reduction", f"{report['macs_reduction']:.3f}x"))
    acc = report.get("accuracy")
    if acc and acc.get("delta_pt") is not None:
        lines.append(("accuracy change", f"{acc['delta_pt']:+.2f} pt on {acc['n']} {acc['split']} images"))
    return lines


def _warnings(report: dict[str, Any]) -> str:
    found = [(report.get(k) or {}).get("warning") for k in ("latency", "accuracy")]
    return "".join(f'<p class="warning">warning: {_e(w)}</p>' for w in found if w)


def _stage_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for s in report["stages"]:
        rec = s.get("record") or {}
        budget = rec.get("budget") or rec.get("search_budget") or {}
        met = rec.get("budget_met", budget.get("met"))
        rows.append([s.get("method", "?"), f"{s.get('seconds', 0):.1f}", budget.get("resource", "—"),
                     f"{budget['target']:.4g}" if "target" in budget else "—",
                     "—" if met is None else "met" if met else "NOT met"])
    return rows


def layer_tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, head, rows) of each stage's per-layer result: pruned widths, HAQ's policy, int8's precisions."""
    tables = []
    for s in report["stages"]:
        rec = s.get("record") or {}
        if isinstance(rec.get("widths"), dict) and "search" in rec:
            macs = [{x["name"]: x["macs"] for x in report[k].get("layers", [])} for k in ("original", "final")]
            tables.append((f"{s['method']}: output channels per prunable layer",
                           ["layer", "before", "after", "kept", "MACs before", "MACs after"],
                           [[n, b, a, f"{100 * a / b:.0f}%" if b else "—", *(fmt_count(m.get(n)) for m in macs)]
                            for n, (b, a) in rec["widths"].items()]))
            if rec.get("not_pruned"):
                tables.append((f"{s['method']}: not pruned", ["layer", "why"], list(rec["not_pruned"].items())))
        elif rec.get("rows") and "search_budget" in rec:
            tables.append((f"{s['method']}: precision per layer", ["layer", "precision", "bits w/a", "cost",
                                                                   "cost is", "exported as"],
                           [[r["layer"], r["precision"], f"{r['weight_bits']}/{r['act_bits']}", f"{r['cost']:.4g}",
                             "measured" if r.get("measured") else "modelled", r.get("exported_as", "")]
                            for r in rec["rows"]]))
        elif s["method"].startswith("reparam."):
            tables.append((f"{s['method']}: replaced or kept, per layer",
                           ["layer", "standalone ms", "in the model", "MACs", "fit error", "decision"],
                           [[r["name"], f"{r['original_ms']:.4f} -> {r['replacement_ms']:.4f}",
                             _ratio(r.get("in_model")), f"{fmt_count(r['original_macs'])} -> "
                             f"{fmt_count(r['replacement_macs'])}",
                             f"{r['fit']['relative_error']:.3f}" if r.get("fit") else "—", r["reason"]]
                            for r in rec["layers"]]))
        elif isinstance(rec.get("layers"), dict) and rec["layers"]:
            tables.append((f"{s['method']}: precision per layer", ["layer", "precision"], list(rec["layers"].items())))
    profile = report.get("layer_profile") or {}
    if profile.get("layers"):
        tables.append(("time per layer in the runtime's profile (shares of the measured median, ms)",
                       ["layer", "original", "result"],
                       [[r["layer"], f"{r['original_ms']:.4f}", f"{r['final_ms']:.4f}"]
                        for r in profile["layers"] + figures.unassigned(profile)]))
    return tables


def _ratio(r: dict[str, Any] | None) -> str:
    return "—" if not r else f"{r['ratio']:.3f}x [{r['low']:.3f}, {r['high']:.3f}]"


def _kv(d: dict[str, Any], prefix: str = "") -> list[list[Any]]:
    """(key, value) rows; a nested dict's keys are dotted (`cpu_int8.int8_isa`), a list is comma-joined."""
    rows: list[list[Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            rows += _kv(v, f"{prefix}{k}.")
        else:
            rows.append([prefix + k, ", ".join(map(str, v)) if isinstance(v, list) else v])
    return rows


def _protocol_sections(report: dict[str, Any]) -> str:
    """How the latencies were measured (the final model's protocol and environment) and how data was fed."""
    final = report["latency"].get("final") or {}
    parts = []
    if final.get("protocol"):
        parts.append("<h3>protocol</h3>" + _table(["setting", "value"], _kv(final["protocol"]), "kv"))
    if final.get("environment"):
        parts.append("<h3>environment</h3>" + _table(["", "value"], _kv(final["environment"]), "kv"))
    data = report.get("data")
    if data:
        parts.append("<h3>data</h3>" + _table(["", "value"], _kv(data), "kv"))
    return "".join(parts) or "<p>The report records no measurement protocol.</p>"


def _img(name: str, png: bytes) -> str:
    caption = figures.FIGURES[name][1]
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(caption)}" width="{figures.WIDTH_PX}" '
            f'height="{figures.HEIGHT_PX}"><figcaption>{_e(caption)} ({_e(name)})</figcaption></figure>')


def _title(report: dict[str, Any]) -> str:
    return f"{report['recipe']}: {report['model']} on {report['target']}"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{_e(title)}</h1>{body}</body></html>\n")


def _result_body(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    parts = [_table(_summary_head(report), _summary_rows(report)),
             _table(None, _headline(report), "kv") if _headline(report) else "", _warnings(report),
             "<h2>stages</h2>", _table(["method", "seconds", "budget on", "budget", ""], _stage_rows(report))]
    if pngs:
        parts += ["<h2>figures</h2>", *(_img(name, png) for name, png in pngs.items())]
    for title, head, rows in layer_tables(report):
        parts += [f"<h2>{_e(title)}</h2>", _table(head, rows)]
    if (report.get("layer_profile") or {}).get("skipped"):
        parts.append(f"<p>No per-layer profile: {_e(report['layer_profile']['skipped'])}.</p>")
    parts += ["<h2>protocol and environment</h2>", _protocol_sections(report)]
    return "".join(parts)


def report_html(report: dict[str, Any], pngs: dict[str, bytes] | None = None) -> str:
    """The page of one result; `pngs` (file name -> PNG) are drawn from the report when not given."""
    return _page(_title(report), _result_body(report, figures.render_all(report) if pngs is None else pngs))


def compare_html(a: dict[str, Any], b: dict[str, Any], labels: tuple[str, str]) -> str:
    """Two results side by side: a table of both summaries, then each one's page in its own column."""
    head = ["", *labels]
    rows = [["result", _title(a), _title(b)]]
    for i, label in enumerate(["original", "final"]):
        for j, col in enumerate(_summary_head(a)[1:], start=1):
            rows.append([f"{label}: {col}", _summary_rows(a)[i][j], _summary_rows(b)[i][j]])
    ha, hb = dict(_headline(a)), dict(_headline(b))
    rows += [[k, ha.get(k, "—"), hb.get(k, "—")] for k in dict.fromkeys([*ha, *hb])]
    columns = "".join(f"<div><h2>{_e(label)}</h2>{_result_body(r, figures.render_all(r))}</div>"
                      for label, r in zip(labels, (a, b)))
    return _page(f"{labels[0]} vs {labels[1]}", _table(head, rows) + f'<div class="side">{columns}</div>')


def report_files(report: dict[str, Any]) -> dict[str, bytes]:
    """The figures and report.html of a result: file name -> bytes, to be written next to its report.json."""
    pngs = figures.render_all(report)
    return {**pngs, REPORT_HTML: report_html(report, pngs).encode()}
