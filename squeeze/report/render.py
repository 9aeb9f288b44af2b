"""Rich tables for the CLI. Functions take result objects and return renderables; no measuring here."""

from __future__ import annotations

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from squeeze.measure.bench import Measurement
from squeeze.measure.gate import GateResult
from squeeze.summary import ModelSummary
from squeeze.target import Target

__all__ = ["fmt_count", "info_view", "bench_view", "gate_view", "recipe_view", "targets_view", "protocol_line"]


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


def protocol_line(m: Measurement) -> str:
    p, e = m.protocol, m.environment
    return (f"{e['runtime']} {e['runtime_version']} on {', '.join(e['providers'])} | {e['cpu']} | "
            f"threads {p['threads']}, batch {p['batch_size']}, warm-up {p['warmup']}, {m.stats.n} samples of "
            f">= {p['min_repeat_ms']:g} ms, interleaved | load avg {e['load_avg_1m']}")


def _noise_warnings(ms: list[Measurement]) -> list[Text]:
    noisy = [m for m in ms if m.stats.noisy]
    if not noisy:
        return []
    worst = max(m.stats.robust_cv for m in noisy)
    return [Text(f"warning: noisy machine (robust CV up to {100 * worst:.1f}% > 5%): close other programs, "
                 "or compare only the ratios, which were measured interleaved in one run.", style="yellow")]


def bench_view(rows, target: Target) -> Group:
    t = Table(title=f"latency on {target.name}")
    t.add_column("model", overflow="fold")
    for col in ("params", "MACs", "median ms", "p90 ms", "MAD ms", "speedup (95% CI)"):
        t.add_column(col, justify="right")
    for r in rows:
        s, st = r.summary, r.measurement.stats
        sp = "1x (ref)" if r.speedup is None else f"{r.speedup.ratio:.3g}x [{r.speedup.low:.3g}, {r.speedup.high:.3g}]"
        t.add_row(r.spec, fmt_count(s.params), fmt_count(s.macs), f"{st.median_ms:.3f}", f"{st.p90_ms:.3f}",
                  f"{st.mad_ms:.3f}", sp)
    ms = [r.measurement for r in rows]
    cached = " (from cache; --no-cache re-measures)" if ms[0].cached else ""
    return Group(t, Text(protocol_line(ms[0]) + cached, style="dim"), *_noise_warnings(ms))


def gate_view(g: GateResult) -> Panel:
    style = {"pass": "green", "fail": "red", "inconclusive": "yellow"}[g.verdict]
    r = g.ratio
    lines = [
        Text(f"NEW / OLD latency: {r.ratio:.3f}x  [{r.low:.3f}, {r.high:.3f}] ({100 * r.confidence:.0f}% CI, {r.method})"),
        Text(f"allowed: <= {1 + g.threshold:.3f}x   median NEW {g.new.stats.median_ms:.3f} ms, "
             f"OLD {g.old.stats.median_ms:.3f} ms   rounds {g.rounds}, {g.elapsed_s:.1f} s, mode {g.mode}"),
        Text(protocol_line(g.new), style="dim"),
    ]
    verdicts = {
        "pass": "PASS: no regression beyond the threshold.",
        "fail": "FAIL: NEW is slower than allowed, with confidence.",
        "inconclusive": "PASS (inconclusive): the interval straddles the threshold; a regression was not shown.",
    }
    return Panel(Group(*lines, *_noise_warnings([g.new, g.old])), title=verdicts[g.verdict], border_style=style)


def recipe_view(report: dict) -> Group:
    t = Table(title=f"recipe {report['recipe']} on {report['target']}")
    for col in ("", "params", "MACs", "size"):
        t.add_column(col, justify="right" if col else "left")
    for key in ("original", "final"):
        s = report[key]
        t.add_row(key, fmt_count(s["params"]), fmt_count(s["macs"]), fmt_bytes(s["size_bytes"]))
    st = Table(title="stages")
    for col in ("method", "seconds", "result"):
        st.add_column(col)
    for s in report["stages"]:
        rec = s["record"]
        if "median_ms" in rec:
            result = f"{rec['label']}: median {rec['median_ms']:.3f} ms"
        elif "parity" in rec:
            p = rec["parity"]
            result = f"{rec['exporter']} export, parity max abs err {p['max_abs_err']:.2e} ({'ok' if p['passed'] else 'FAILED'})"
        else:
            result = ", ".join(f"{k}={v}" for k, v in rec.items())[:120]
        st.add_row(s["method"], f"{s['seconds']:.2f}", result)
    written = Text("written: " + ", ".join(report["written"]), style="dim")
    return Group(t, st, written)


def targets_view(targets: list[Target]) -> Table:
    t = Table(title="targets")
    for col in ("name", "runtime", "device", "description"):
        t.add_column(col)
    for tg in targets:
        t.add_row(tg.name, tg.runtime, tg.device, tg.description)
    return t
