"""Figures of a result, drawn from its report.json (the dict `squeeze prune`, `quantize` and `run` write): PNG
bytes of a fixed size, or None where the report does not record what a figure shows (nothing is estimated).

Each figure reads the first stage whose record carries its data: NetAdapt's proposals, AMC's and HAQ's episodes,
int8's type candidates; pruned widths or per-layer precisions; HAQ's per-layer cost table; the reward curves.
Drawn on matplotlib Figure objects with the Agg canvas, never pyplot: no display, no global state.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from itertools import accumulate
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["WIDTH_PX", "HEIGHT_PX", "FIGURES", "Point", "Candidates", "candidates", "pareto_front", "tradeoff", "layers",
           "layer_latency", "layer_profile", "reward_curve", "render_all", "unassigned"]

WIDTH_PX, HEIGHT_PX, DPI = 800, 500, 100
ORIGINAL, RESULT, CHOSEN = "#8c8c8c", "#1f77b4", "#d62728"

_RESOURCE_UNITS = {"latency_ms": "latency (ms)", "macs": "MACs", "size_bytes": "size (bytes)"}
_LATENCY_SOURCES = {"measured": "measured", "table": "lookup table", "table+recalibrate": "lookup table, re-fitted",
                    "counted": "counted"}


@dataclass(frozen=True)
class Point:
    """One candidate the search evaluated: its resource (as the search saw it) and accuracy in percent."""

    resource: float
    accuracy_pct: float
    chosen: bool = False


@dataclass(frozen=True)
class Candidates:
    points: list[Point]
    x_label: str
    y_label: str
    title: str
    budget: float | None = None  # the search's budget in the x axis' units


def _records(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [s.get("record") or {} for s in report.get("stages", [])]


def _first(report: dict[str, Any], test: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    return next((r for r in _records(report) if test(r)), None)


def _netadapt(rec: dict[str, Any]) -> Candidates | None:
    """Every proposal of every iteration that was scored (NetAdapt with data: accuracy after its short fine-tune);
    the last iteration's winner is the model that went on to the long fine-tune."""
    history = rec["history"]
    last = history[-1] if history else None
    points = []
    for h in history:
        winner = (h["layer"], h["width_after"]) if h is last else None
        points += [Point(p["resource"], 100 * p["accuracy"], (p.get("layer"), p.get("width")) == winner)
                   for p in h["proposals"] if p.get("accuracy") is not None]
    return _candidates(rec, points, "val top-1 after the short fine-tune (%)",
                       f"{rec['search']}: {len(points)} proposals in {len(history)} iterations")


def _amc(rec: dict[str, Any]) -> Candidates | None:
    """One point per episode (val top-1 of the least-squares rebuilt policy); the policy selection took."""
    chosen = next((s["episode"] for s in rec.get("selection", []) if s.get("chosen")), None)
    points = [Point(h["resource"], 100 * h["accuracy"], h["iteration"] == chosen)
              for h in rec["history"] if h.get("accuracy") is not None]
    return _candidates(rec, points, "val top-1 without fine-tune (%)", f"AMC: {len(points)} episodes")


def _candidates(rec: dict[str, Any], points: list[Point], y_label: str, title: str) -> Candidates | None:
    budget = rec.get("budget") or {}
    resource = budget.get("resource", "latency_ms")
    source = _LATENCY_SOURCES.get(rec.get("latency_source", ""), rec.get("latency_source", ""))
    x_label = _RESOURCE_UNITS.get(resource, resource) + (f", {source}" if source else "")
    return Candidates(points, x_label, y_label, title, budget.get("target")) if points else None


def _haq(rec: dict[str, Any]) -> Candidates | None:
    """One point per episode: the policy's cost from the cost table and its val top-1 after the short fine-tune."""
    chosen = [r["precision"] for r in rec.get("rows", [])]
    points = [Point(e["info"]["cost"], e["info"]["accuracy"], e["info"].get("policy") == chosen)
              for e in rec["episodes"] if e.get("info", {}).get("accuracy") is not None]
    budget = rec.get("search_budget") or {}
    x_label = ("latency (ms), sum of the per-layer cost table" if budget.get("resource") == "latency_ms"
               else "size (bytes), counted")
    return Candidates(points, x_label, "val top-1 after the short fine-tune (%)",
                      f"HAQ: {len(points)} episodes") if points else None


def _int8(rec: dict[str, Any]) -> Candidates | None:
    """Each int8 type candidate: fp32's median over the measured speedup, and its top-1 through ONNX Runtime."""
    choice = rec["type_choice"]
    chosen = choice.get("chosen")
    points = [Point(choice["fp32_median_ms"] / c["speedup"]["ratio"], 100 * c["parity"]["top1"],
                    bool(chosen) and all(c.get(k) == v for k, v in chosen.items()))
              for c in choice["candidates"] if c.get("speedup") and c["parity"].get("top1") is not None]
    return Candidates(points, "latency (ms), measured (fp32 median / speedup)", "held-out top-1, ONNX Runtime (%)",
                      f"int8 types: {len(points)} candidates") if points else None


# (test that a stage record has the data, its reader), in the order a stage is looked for
_CANDIDATE_READERS: list[tuple[Callable[[dict[str, Any]], bool], Callable[[dict[str, Any]], Candidates | None]]] = [
    (lambda r: r.get("search") == "amc" and "history" in r, _amc),
    (lambda r: "search" in r and "history" in r, _netadapt),
    (lambda r: "episodes" in r and "search_budget" in r, _haq),
    (lambda r: "type_choice" in r, _int8),
]


def candidates(report: dict[str, Any]) -> Candidates | None:
    """The candidates of the first stage that records some, or None."""
    for rec in _records(report):
        for test, read in _CANDIDATE_READERS:
            if test(rec):
                found = read(rec)
                if found:
                    return found
    return None


def pareto_front(points: list[Point]) -> list[Point]:
    """The points no other point beats on both axes (less resource, more accuracy), by resource ascending."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.resource, -p.accuracy_pct)):
        if not front or p.accuracy_pct > front[-1].accuracy_pct:
            front.append(p)
    return front


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)  # no bbox_inches="tight": the size stays WIDTH_PX x HEIGHT_PX
    return buf.getvalue()


def tradeoff(report: dict[str, Any]) -> bytes | None:
    """Accuracy against resource of every candidate the search evaluated, the Pareto front, the chosen one."""
    found = candidates(report)
    if found is None:
        return None
    fig, ax = _figure()
    pts = found.points
    ax.scatter([p.resource for p in pts], [p.accuracy_pct for p in pts], s=18, alpha=0.6, color=RESULT,
               label="candidates")
    front = pareto_front(pts)
    ax.step([p.resource for p in front], [p.accuracy_pct for p in front], where="post", color="black", lw=1,
            label="Pareto front")
    chosen = [p for p in pts if p.chosen]
    if chosen:
        ax.scatter([p.resource for p in chosen], [p.accuracy_pct for p in chosen], s=120, marker="*", color=CHOSEN,
                   zorder=3, label="chosen")
    if found.budget is not None:
        ax.axvline(found.budget, color=CHOSEN, ls="--", lw=1, label="budget")
    ax.set(xlabel=found.x_label, ylabel=found.y_label, title=found.title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


def _reparam(report: dict[str, Any]) -> dict[str, Any] | None:
    """A reparam stage's record: one row per candidate conv, with its standalone costs and whether it was replaced."""
    return _first(report, lambda r: isinstance(r.get("layers"), list) and bool(r["layers"]) and "spec" in r)


def _per_layer(report: dict[str, Any]) -> tuple[str, str, list[str], list[tuple[str, list[float]]]] | None:
    """(title, y label, layer names, [(series label, one value per layer)]): widths or bits before and after."""
    rec = _first(report, lambda r: "widths" in r and "search" in r)
    if rec:
        names = list(rec["widths"])
        return ("output channels per prunable layer", "channels", names,
                [("before", [rec["widths"][n][0] for n in names]), ("after", [rec["widths"][n][1] for n in names])])
    rec = _first(report, lambda r: bool(r.get("rows")) and "search_budget" in r)
    if rec:
        rows = rec["rows"]
        return ("bits per layer (fp32 before)", "bits", [r["layer"] for r in rows],
                [("before", [32.0] * len(rows)), ("after: weights", [r["weight_bits"] for r in rows]),
                 ("after: activations", [r["act_bits"] for r in rows])])
    rec = _reparam(report)
    if rec:
        rows = rec["layers"]
        return ("MACs per candidate layer (replaced where chosen)", "MMACs", [r["name"] for r in rows],
                [("before", [r["original_macs"] / 1e6 for r in rows]),
                 ("after", [(r["replacement_macs"] if r["chosen"] else r["original_macs"]) / 1e6 for r in rows])])
    rec = _first(report, lambda r: isinstance(r.get("layers"), dict) and bool(r["layers"]))
    if rec:
        bits = {"fp32": 32, "fp16": 16, "int16": 16, "int8": 8}
        after = {n: bits[p] for n, p in rec["layers"].items() if p in bits}
        if after:
            return ("bits per layer (fp32 before)", "bits", list(after),
                    [("before", [32.0] * len(after)), ("after", list(after.values()))])
    return None


def _bars(title: str, y_label: str, names: list[str], series: list[tuple[str, list[float]]],
          colors: list[str]) -> bytes:
    fig, ax = _figure()
    width = 0.8 / len(series)
    for i, ((label, values), color) in enumerate(zip(series, colors)):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(names))], values, width, label=label,
               color=color)
    crowded = len(names) > 6
    ax.set_xticks(range(len(names)), names, rotation=45 if crowded else 0, ha="right" if crowded else "center",
                  fontsize=8 if len(names) > 12 else 10)
    top = max((v for _, values in series for v in values), default=1)
    ax.set(ylabel=y_label, title=title, ylim=(0, 1.2 * top))  # headroom above the bars for the legend
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper right", ncols=len(series))
    return _png(fig)


def layers(report: dict[str, Any]) -> bytes | None:
    """Per-layer output channels (prune) or bits (quantize) before and after."""
    found = _per_layer(report)
    if found is None:
        return None
    title, y_label, names, series = found
    return _bars(title, y_label, names, series, [ORIGINAL, RESULT, "#2ca02c"])


def layer_latency(report: dict[str, Any]) -> bytes | None:
    """Per-layer latency, original against result, where the report carries per-layer times: reparam's standalone
    entries of each candidate and its replacement, or HAQ's cost table (each layer's ms at fp32 and at its chosen
    precision) under a latency budget. Other records hold none."""
    rec = _reparam(report)
    if rec:
        rows = rec["layers"]
        return _bars("per-layer latency (lookup table, standalone, ms)", "ms", [r["name"] for r in rows],
                     [("original", [r["original_ms"] for r in rows]),
                      ("result", [r["replacement_ms"] if r["chosen"] else r["original_ms"] for r in rows])],
                     [ORIGINAL, RESULT])
    rec = _first(report, lambda r: bool(r.get("rows")) and r.get("search_budget", {}).get("resource") == "latency_ms")
    if rec is None:
        return None
    # cost_table: one row per (layer, precision) with its latency_ms; rows: the chosen precision and its cost
    fp32 = {c["layer"]: c["latency_ms"] for c in rec.get("cost_table", []) if c.get("precision") == "fp32"}
    rows = [r for r in rec["rows"] if r["layer"] in fp32]
    if not rows:
        return None
    return _bars("per-layer latency (lookup table, ms)", "ms", [r["layer"] for r in rows],
                 [("original (fp32)", [fp32[r["layer"]] for r in rows]), ("result", [r["cost"] for r in rows])],
                 [ORIGINAL, RESULT])


def layer_profile(report: dict[str, Any]) -> bytes | None:
    """Per-layer time of the original and the result in the runtime's profile, as shares of each model's
    measured median, with what no layer was charged (the graph's input and output conversions)."""
    found = report.get("layer_profile") or {}
    rows = found.get("layers")
    if not rows:
        return None
    rows = rows + unassigned(found)
    return _bars("per-layer time (ONNX Runtime profile, shares of the measured median, ms)", "ms",
                 [r["layer"] for r in rows], [("original", [r["original_ms"] for r in rows]),
                                              ("result", [r["final_ms"] for r in rows])], [ORIGINAL, RESULT])


def unassigned(profile: dict[str, Any]) -> list[dict[str, Any]]:
    """The time no layer was charged, as a row, where there was any."""
    other = profile["other_ms"]
    if not other["original"] and not other["final"]:
        return []
    return [{"layer": "(no layer)", "original_ms": other["original"], "final_ms": other["final"]}]


def _rewards(report: dict[str, Any]) -> tuple[str, list[float]] | None:
    rec = _first(report, lambda r: bool(r.get("reward_curve")))
    if rec:
        return "AMC", rec["reward_curve"]
    rec = _first(report, lambda r: bool(r.get("episodes")) and "search_budget" in r)
    if rec:
        return "HAQ", [e["reward"] for e in rec["episodes"]]
    return None


def reward_curve(report: dict[str, Any]) -> bytes | None:
    """Reward per episode of AMC or HAQ, with the best so far."""
    found = _rewards(report)
    if found is None:
        return None
    name, rewards = found
    fig, ax = _figure()
    episodes = range(1, len(rewards) + 1)
    best = list(accumulate(rewards, max))
    ax.plot(episodes, rewards, marker="o" if len(rewards) <= 50 else None, ms=3, lw=1, color=RESULT, label="reward")
    ax.plot(episodes, best, color=CHOSEN, lw=1.5, label="best so far")
    ax.set(xlabel="episode", ylabel="reward", title=f"{name}: reward per episode")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


# file name -> (figure, caption), in the order a report shows them
FIGURES: dict[str, tuple[Callable[[dict[str, Any]], bytes | None], str]] = {
    "figure-tradeoff.png": (tradeoff, "Accuracy against resource of every candidate the search evaluated"),
    "figure-layers.png": (layers, "Per-layer widths or bits, before and after"),
    "figure-layer-latency.png": (layer_latency, "Per-layer latency as the search priced it, original against result"),
    "figure-layer-profile.png": (layer_profile, "Per-layer time in the runtime's profile, original against result"),
    "figure-reward.png": (reward_curve, "Reward per search episode"),
}


def render_all(report: dict[str, Any]) -> dict[str, bytes]:
    """File name -> PNG bytes of every figure the report has data for."""
    pngs = {name: draw(report) for name, (draw, _) in FIGURES.items()}
    return {name: png for name, png in pngs.items() if png is not None}
