"""Rich tables for the CLI. Functions take result objects and return renderables; no measuring here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from squeeze.measure.bench import Measurement
from squeeze.measure.gate import GateResult
from squeeze.measure.protocol import CONTENDED, CONTENTION_TRIES
from squeeze.preprocessing import Preprocessing
from squeeze.target import Target

if TYPE_CHECKING:  # summarizing imports torch; rendering a summary (or a target list) does not need it
    from squeeze.doctor import CheckReport
    from squeeze.prune.tables import CheckResult
    from squeeze.model.summary import ModelSummary

__all__ = ["fmt_count", "info_view", "bench_view", "gate_view", "recipe_view", "targets_view", "protocol_line",
           "catalog_view", "lut_check_view", "target_check_view"]


def fmt_count(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def info_view(s: ModelSummary, max_layers: int = 200) -> Group:
    head = Table.grid(padding=(0, 2))
    for k, v in [("model", s.name), ("kind", s.kind), ("input shape", "x".join(map(str, s.input_shape))),
                 ("params", f"{fmt_count(s.params)} ({s.params:,})"),
                 ("MACs", f"{fmt_count(s.macs)} ({s.macs:,})" if s.macs is not None else "—"),
                 ("size", fmt_bytes(s.size_bytes))]:
        head.add_row(Text(k, style="bold"), v)
    parts = [head]
    if s.layers:
        t = Table(title="layers", show_lines=False)
        t.add_column("layer", overflow="fold")
        for col in ("type", "output", "params", "MACs", "% MACs"):
            t.add_column(col, justify="left" if col == "type" else "right")
        for layer in s.layers[:max_layers]:
            share = f"{100 * layer.macs / s.macs:.1f}" if s.macs else "—"
            t.add_row(layer.name, layer.type, "x".join(map(str, layer.output_shape)), fmt_count(layer.params),
                      fmt_count(layer.macs), share)
        if len(s.layers) > max_layers:
            t.caption = f"{len(s.layers) - max_layers} more layers in --json"
        parts.append(t)
    parts += [Text(f"note: {n}", style="yellow") for n in s.notes]
    return Group(*parts)


def latency_labels(env: dict) -> list[str]:
    """What a figure is not: untuned TVM CPU code is not the target's latency, an emulated board not ARM's."""
    return [label for flag, label in (("untuned", "untuned (not the target's tuned latency)"),
                                      ("emulated", "emulated (not ARM latency)")) if env.get(flag)]


def protocol_line(m: Measurement) -> str:
    p, e = m.protocol, m.environment
    labels = "".join(f" | {label}" for label in latency_labels(e))
    return (f"{e['runtime']} {e['runtime_version']} on {', '.join(e['providers'])} | {e['cpu']} | "
            f"threads {p['threads']}, batch {p['batch_size']}, warm-up {p['warmup']}, {m.stats.n} samples of "
            f">= {p['min_repeat_ms']:g} ms, interleaved | load avg {e['load_avg_1m']}{labels}")


def _noise_warnings(ms: list[Measurement]) -> list[Text]:
    noisy = [m for m in ms if m.stats.noisy]
    if not noisy:
        return []
    worst = max(m.stats.robust_cv for m in noisy)
    return [Text(f"warning: noisy machine (robust CV up to {100 * worst:.1f}% > 5%): close other programs, "
                 "or compare only the ratios, which were measured interleaved in one run.", style="yellow")]


def _load_now() -> float:
    import os

    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _cache_notes(ms: list[Measurement]) -> list[Text]:
    """A cached latency says when and under what load it was measured, and suggests re-measuring when the
    machine's load now is unlike then (ratios came from one run either way; absolute times move with load)."""
    m = next((m for m in ms if m.cached), None)
    if m is None:
        return []
    env = m.environment
    then, now = env.get("load_avg_1m", float("nan")), _load_now()
    line = f"latency from the cache: measured {env.get('measured_at', 'in an earlier run')} at load avg {then}"
    if abs(now - then) >= max(1.0, 0.25 * (env.get("cpu_count") or 1)):
        return [Text(f"{line}; the load is {now:.2f} now, so those milliseconds may not hold today: --no-cache "
                     "re-measures", style="yellow")]
    return [Text(f"{line} (--no-cache re-measures)", style="dim")]


def bench_view(rows, target: Target) -> Group:
    labels = latency_labels(rows[0].measurement.environment)
    t = Table(title=f"latency on {target.name}" + (f": {', '.join(labels)}" if labels else ""))
    t.add_column("model", overflow="fold")
    for col in ("params", "MACs", "median ms", "p90 ms", "MAD ms", "speedup (95% CI)"):
        t.add_column(col, justify="right")
    for r in rows:
        s, st = r.summary, r.measurement.stats
        sp = "1x (ref)" if r.speedup is None else f"{r.speedup.ratio:.3g}x [{r.speedup.low:.3g}, {r.speedup.high:.3g}]"
        t.add_row(r.spec, fmt_count(s.params), fmt_count(s.macs), f"{st.median_ms:.3f}", f"{st.p90_ms:.3f}",
                  f"{st.mad_ms:.3f}", sp)
    ms = [r.measurement for r in rows]
    return Group(t, Text(protocol_line(ms[0]), style="dim"), *_cache_notes(ms), *_noise_warnings(ms))


def _gate_title(g: GateResult) -> str:
    if g.verdict == "pass":
        return "PASS: no regression beyond the threshold."
    if g.verdict == "fail":
        return "FAIL: NEW is slower than allowed, with confidence."
    # The reason says what the gate still lacked when it stopped, e.g. not "straddles" when the interval was above.
    return f"PASS (inconclusive): {g.reason or 'no verdict was reached'}; a regression was not shown."


def gate_view(g: GateResult) -> Panel:
    style = {"pass": "green", "fail": "red", "inconclusive": "yellow"}[g.verdict]
    r = g.ratio
    lines = [
        Text(f"NEW / OLD latency: {r.ratio:.3f}x  [{r.low:.3f}, {r.high:.3f}] ({100 * r.confidence:.0f}% CI, {r.method})"),
        Text(f"allowed: <= {1 + g.threshold:.3f}x   median NEW {g.new.stats.median_ms:.3f} ms, "
             f"OLD {g.old.stats.median_ms:.3f} ms   rounds {g.rounds}, {g.elapsed_s:.1f} s, mode {g.mode}"),
        Text(protocol_line(g.new), style="dim"),
    ]
    if g.protocol and "round_statistic" in g.protocol:
        lines.append(Text(f"gate: {g.protocol['order']}, {g.protocol['round_statistic']}; {r.method}", style="dim"))
    if g.reason and g.verdict == "fail":
        lines.append(Text(f"note: {g.reason}", style="yellow"))
    return Panel(Group(*lines, *_noise_warnings([g.new, g.old])), title=_gate_title(g), border_style=style)


def _fmt_ms(m: dict | None) -> str:
    return f"{m['stats']['median_ms']:.3f}" if m else "—"


def recipe_view(report: dict) -> Group:
    lat, acc = report["latency"], report.get("accuracy")
    t = Table(title=f"{report['recipe']}: {report['model']} on {report['target']}")
    t.add_column("")
    for col in ("params", "MACs", "model.onnx", "latency ms (median)", f"top-1 ({acc['split']}, ONNX)" if acc else "top-1"):
        t.add_column(col, justify="right")
    for key in ("original", "final"):
        s = report[key]
        top1 = f"{100 * acc[key + '_top1']:.2f}%" if acc else "—"
        t.add_row(key, fmt_count(s["params"]), fmt_count(s["macs"]), fmt_bytes(s["onnx_bytes"]), _fmt_ms(lat[key]), top1)
    lines = []
    if lat["speedup"]:
        sp = lat["speedup"]
        line = f"measured speedup {sp['ratio']:.3f}x [{sp['low']:.3f}, {sp['high']:.3f}] (95% CI, interleaved)"
        if report.get("macs_reduction"):
            line += (f"; MACs reduction {report['macs_reduction']:.3f}x; speedup / MACs reduction "
                     f"{sp['ratio'] / report['macs_reduction']:.2f}")
        lines.append(Text(line))
        if lat.get("warning"):
            lines.append(Text(f"warning: {lat['warning']}", style="bold yellow"))
    if report.get("data"):
        lines.append(_preprocessing_line(report["data"]))
    if acc:
        lines += _accuracy_lines(acc)
    st = Table(title="stages")
    for col in ("method", "seconds", "result"):
        st.add_column(col, overflow="fold")
    for s in report["stages"]:
        st.add_row(s["method"], f"{s['seconds']:.1f}", _stage_result(s["record"]))
    parts = [t, *lines, st]
    widths = next((s["record"]["widths"] for s in report["stages"] if "widths" in s["record"]), None)
    if widths:
        wt = Table(title="widths (output channels per prunable layer)")
        for col in ("layer", "before", "after"):
            wt.add_column(col, justify="left" if col == "layer" else "right", overflow="fold")
        for name, (before, after) in widths.items():
            wt.add_row(name, str(before), str(after) if after != before else "=")
        parts.append(wt)
    final = Measurement.from_json(lat["final"])
    parts += [Text(protocol_line(final), style="dim"), *_cache_notes([final])]
    parts.append(Text("written: " + ", ".join(report["written"]), style="dim"))
    return Group(*parts)


_PREPROCESSING_SOURCES = {
    "given": "as given",
    "model": "as the model's checkpoint recorded",
    "default": "squeeze's default; the model records none: pass --normalize if it was trained otherwise",
}


def _preprocessing_line(data: dict) -> Text:
    pre = Preprocessing.model_validate(data["preprocessing"])
    source = _PREPROCESSING_SOURCES.get(data.get("preprocessing_source"), "")
    return Text(f"data {data['spec']}: {pre.describe()}" + (f" ({source})" if source else ""))


def _accuracy_lines(acc: dict) -> list[Text]:
    """The accuracy change, or, over a mis-fed original, why it is no gain (a near-chance one: no figure)."""
    change = None if acc.get("delta_pt") is None else f"accuracy change {acc['delta_pt']:+.2f} pt"
    if not acc.get("warning"):
        return [Text(f"{change} on {acc['n']} {acc['split']} images")]
    if change is None:
        verdict = "accuracy change not shown: the original was not fed the way it was trained"
    else:
        verdict = f"{change}: not a gain from compression (see the warning)"
    return [Text(f"warning: {acc['warning']}", style="bold yellow"), Text(verdict, style="yellow")]


def _stage_result(rec: dict) -> str:
    if "median_ms" in rec:
        return f"{rec['label']}: median {rec['median_ms']:.3f} ms"
    if "parity" in rec:
        p = rec["parity"]
        return f"{rec['exporter']} export, parity max abs err {p['max_abs_err']:.2e} ({'ok' if p['passed'] else 'FAILED'})"
    if "search" in rec:
        b = rec["budget"]
        met = "met" if rec["budget_met"] else "NOT met"
        return (f"{rec['search']}: {b['resource']} {b['original']:.4g} -> {rec['final_measured']:.4g} "
                f"(budget {b['target']:.4g}, {met}) in {len(rec['history'])} steps, {rec['search_seconds']:.0f} s")
    return ", ".join(f"{k}={v}" for k, v in rec.items())[:120]


def targets_view(targets: list[Target]) -> Table:
    t = Table(title="targets")
    for col in ("name", "runtime", "device", "description"):
        t.add_column(col)
    for tg in targets:
        t.add_row(tg.name, tg.runtime, tg.device, tg.description)
    return t


def catalog_view(kind: str, rows: list[tuple[str, str]]) -> Table:
    """`squeeze list KIND`: name and description of each registered item."""
    t = Table(title=kind)
    t.add_column("name")
    t.add_column("description")
    for name, desc in rows:
        t.add_row(name, desc)
    return t


def _plans(plans: list[int]) -> str:
    return f"plan{'s' * (len(plans) > 1)} {', '.join(map(str, plans))}"


def lut_check_view(result: CheckResult, model: str, target: str) -> Group:
    """Predicted against measured latency per random plan, then the error's median and p90."""
    t = Table(title=f"lookup table vs measurement: {model} on {target}")
    for col in ("plan", "MACs", "measured ms", "machine", "table ms", "error", "recalibrated ms", "error ",
                "layers priced"):
        t.add_column(col, justify="right")
    for r in result.rows:
        recal = (("(fit)" if r.plan in result.fitted_plans else "(busy)", "") if r.recalibrated_ms is None else
                 (f"{r.recalibrated_ms:.3f}", f"{r.recalibrated_error_pct:+.1f}%"))
        priced = ", ".join(f"{n} {source}" for source, n in sorted(r.source_counts.items()))
        t.add_row(str(r.plan), f"{r.macs / 1e6:.1f}M", f"{r.measured_ms:.3f}", f"{result.contention(r):.2f}x",
                  f"{r.predicted_ms:.3f}", f"{r.error_pct:+.1f}%", *recal, priced)
    (med, p90), (rmed, rp90) = result.summary(), result.summary(recalibrated=True)
    busy = [p for p in range(result.fit_on) if p not in result.fitted_plans]
    refit = (f"after recalibrating on {_plans(result.fitted_plans)}" if result.recalibrated else "nothing recalibrated")
    if busy:
        refit += f" ({_plans(busy)} measured on a contended machine in every try, so not fitted on)"
    lines = [t, f"table alone: median |error| {med:.1f}%, p90 {p90:.1f}%; {refit}: "
                f"median {rmed:.1f}%, p90 {rp90:.1f}% (original {result.reference_ms:.3f} ms; measured = interleaved "
                "with the original, scaled by its latency; machine = the original's time in that run over its fastest "
                "run; layers priced: standalone = timed alone, in-context = "
                "profiled inside the model, scaled = in-context at the nearest profiled width x its latency alone at "
                "the two widths, timed side by side, or a depthwise conv's work)"]
    if slower := result.slower_plans:
        lines.append(Text(f"{len(slower)} of {len(result.rows)} plans (plan {', '.join(map(str, slower))}) measured "
                          "slower than the original with fewer channels in every layer: the runtime changes layout or "
                          "kernel at those widths, which no sum of layers prices. Searches on this model should "
                          "measure candidates (--latency-source measured) rather than trust the table.",
                          style="yellow"))
    if contended := result.contended_plans:
        lines.append(Text(f"{len(contended)} of {len(result.rows)} plans (plan {', '.join(map(str, contended))}) were "
                          f"measured while the machine ran over {CONTENDED:.1f}x slower than at its quietest in this "
                          f"check, in each of {CONTENTION_TRIES} tries: a busy machine slows small models more than "
                          "large ones, so their measured ratios (and errors) are a busier machine's. Check again on a "
                          "quieter machine.", style="yellow"))
    return Group(*lines)


_STEP_STYLES = {"pass": "green", "fail": "bold red", "skip": "dim"}


def target_check_view(report: CheckReport, target: str) -> Table:
    """`squeeze targets check`: each step of the target's path and its result."""
    t = Table(title=f"targets check {target}")
    for col in ("step", "result", "detail"):
        t.add_column(col, overflow="fold")
    for s in report.steps:
        # A failure's full message (with its fix) follows the table; its first sentence is enough here.
        detail = s.detail.split(". ")[0] + "." if s.status == "fail" else s.detail
        t.add_row(s.name, f"[{_STEP_STYLES[s.status]}]{s.status.upper()}[/]", escape(detail))
    return t


def proxy_view(result: dict) -> Group:
    """`squeeze proxy check`: one row per proxy and depth, the recommendation under it."""
    depths = result["depths"]
    timing = ", ".join(f"{s:.0f} s" for s in result["full_seconds"])
    where = (" at every depth" if len(depths) > 1 else
             f", cut from every layer at {depths[0]:.0%}" if depths[0] < 1 else "")
    table = Table(title=f"proxy check: {result['method']} candidates of {result['model']} on {result['data']} "
                        f"({result['candidates']} candidates{where}; full evaluation {timing})")
    picks = any(r.get("pick_kept") is not None for r in result["rows"])
    columns = ("proxy", "cut from" if len(depths) > 1 else None, "Spearman rho [95%]", "Kendall tau",
               "top-k overlap", f"best of {result['rows'][0]['pick_size']} kept (pt lost)" if picks else None, "cost")
    for col in filter(None, columns):
        table.add_column(col, justify="left" if col == "proxy" else "right")
    order = list(dict.fromkeys(r["label"] for r in result["rows"]))  # each proxy's depths next to each other
    for r in sorted(result["rows"], key=lambda r: (order.index(r["label"]), -r["base_ratio"])):
        cells = [r["label"], *([f"{r['base_ratio']:.0%}"] if len(depths) > 1 else []),
                 f"{r['spearman']:.2f} [{r['spearman_low']:.2f}, {r['spearman_high']:.2f}]", f"{r['kendall']:.2f}",
                 f"{r['top_k_overlap']:.0%} of {r['top_k']}",
                 *([f"{r['pick_kept']:.0%} ({100 * r['pick_loss']:.2f})"] if picks else []), f"{r['cost_ratio']:.2f}x"]
        table.add_row(*cells)
    best = result["recommended"]
    at_all = " at every depth" if len(depths) > 1 else ""
    kept = f", the best of {best['pick_size']} kept in {best['pick_kept']:.0%}" if best and picks else ""
    if best and picks and best["proxy"]["promote"]:  # judged on the pick alone (ProxyRow.keeps)
        why = (f"the best of {best['pick_size']} kept in {best['pick_kept']:.0%}{at_all}; below its top "
               f"{best['proxy']['promote']} the order decides nothing: rho's interval from {best['spearman_low']:.2f}")
    elif best:
        why = f"rho's interval from {best['spearman_low']:.2f}{kept}{at_all}"
    line = (Text(f"recommended: {best['label']} ({why}, {best['cost_ratio']:.2f}x the cost): pass it as the "
                 "search's proxy option", style="green")
            if best else
            Text(f"no proxy keeps the ranking with confidence{at_all} (rho's interval above {result['min_rho']}"
                 + (f", and the best of an iteration's proposals in {result['min_pick']:.0%} of draws" if picks else "")
                 + "): evaluate candidates in full, or check more candidates (--candidates) for narrower intervals",
                 style="yellow"))
    lines = [table, line]
    if result["method"] == "netadapt" and min(depths) == 1:
        lines.append(Text("Late iterations compare cuts of a thinner model, which recover differently: check the "
                          "proxy there too (--from-ratio 1 --from-ratio 0.4) before a deep search.", style="dim"))
    return Group(*lines)
