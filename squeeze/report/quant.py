"""Terminal views of a quantization stage's record, printed under the recipe table by `squeeze quantize`:
int8 / fp16 / QAT (`quant_view`), and HAQ's policy (`haq_view`)."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

__all__ = ["quant_view", "haq_view"]


def _ratio(r: dict | None) -> str:
    return "—" if r is None else f"{r['ratio']:.3f}x [{r['low']:.3f}, {r['high']:.3f}]"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def _verdict(c: dict, chosen: dict | None) -> str:
    if c["parity"]["below_floor"]:
        return "below floor"
    picked = chosen and all(c[k] == v for k, v in chosen.items())
    return "chosen" if picked else "passes"


def _candidates_table(choice: dict, rec: dict) -> Group:
    floor, cpu = rec["parity_floor"], rec["cpu_int8"]
    title = (f"int8 candidates on {choice['measured_on']} (CPU: {', '.join(cpu['int8_isa']) or 'no int8 ISA known'}"
             f"{'' if cpu['int8_dot_product'] else '; no int8 dot product'}); speedup over fp32 (95% CI, "
             f"interleaved); floor: agreement >= {100 * floor['min_agreement']:.0f}%, accuracy within "
             f"{floor['max_accuracy_drop_pt']:g} pt" + (f", SNR >= {floor['min_snr_db']:g} dB" if floor["min_snr_db"]
                                                       is not None else ""))
    t = Table(title=title)
    for col in ("candidate", "speedup", "agreement", "SNR dB", "top-1", ""):
        t.add_column(col, justify="left" if col in ("candidate", "") else "right", overflow="fold")
    for c in choice["candidates"]:
        p = c["parity"]
        t.add_row(c["label"], _ratio(c["speedup"]), _pct(p["top1_agreement"]), f"{p['snr_db']:.1f}",
                  f"{_pct(p['top1'])} (fp32 {_pct(p['reference_top1'])})", _verdict(c, choice["chosen"]))
    below = [Text(f"{c['label']}: below floor: {'; '.join(c['parity']['below_floor'])}", style="yellow")
             for c in choice["candidates"] if c["parity"]["below_floor"]]
    return Group(t, *below)


def quant_view(report: dict) -> Group:
    stage = next((s for s in report["stages"] if s["method"].startswith("quant.")), None)
    if stage is None:
        return Group()
    if stage["method"] == "quant.haq":
        return haq_view(stage["record"])
    rec = stage["record"]
    parts: list = []
    choice = rec.get("type_choice")
    if choice:
        parts.append(_candidates_table(choice, rec))
    auto = rec.get("auto_exclude")
    if auto:
        t = Table(title=f"auto-exclude (started at {_ratio(auto['start_speedup'])})")
        for col in ("step", "blamed by the profile (extra µs when quantized)", "speedup after"):
            t.add_column(col, overflow="fold")
        for i, step in enumerate(auto["steps"], 1):
            blamed = ", ".join(f"{layer} +{us:.0f}" for layer, us in step["blamed_us"].items())
            t.add_row(str(i), blamed, _ratio(step["speedup"]) if step["speedup"] else "all layers float")
        parts.append(t)
    lines = []
    for c in rec.get("confirmations", []):
        lines.append(Text(f"second, fresh run: {c['config']}"
                          + (f" with {len(c['float_layers'])} layer(s) float" if c["float_layers"] else "")
                          + f" {_ratio(c['speedup'])}"))
    if rec.get("fallback"):
        lines.append(Text(f"fell back to {rec['fallback']}; model.onnx is the fp32 model", style="bold yellow"))
    layers = rec.get("layers")
    if layers:
        counts: dict[str, int] = {}
        for p in layers.values():
            counts[p] = counts.get(p, 0) + 1
        floats = [name for name, p in layers.items() if p == "fp32"]
        lines.append(Text("layers: " + ", ".join(f"{n} {p}" for p, n in sorted(counts.items()))
                          + (f" (float: {', '.join(floats)})" if floats and len(floats) < len(layers) else "")))
    par = rec.get("output_parity")
    if par:
        lines.append(Text(f"parity vs fp32 ({par['n']} {par['split']} images, ONNX Runtime): top-1 agreement "
                          f"{100 * par['top1_agreement']:.2f}%, SNR {par['snr_db']:.1f} dB"))
    qat = rec.get("qat")
    if qat:
        tp = qat["torch_vs_onnx"]
        lines.append(Text(f"QAT: torch fake-quant vs ORT int8: top-1 agreement {100 * tp['top1_agreement']:.2f}%, "
                          f"SNR {tp['snr_db']:.1f} dB; fine-tune {qat['fine_tune']['iterations']} steps "
                          f"in {qat['fine_tune']['seconds']:.0f} s"))
    size = rec.get("size_bytes")
    if size:
        lines.append(Text(f"file size {size['fp32']:,} -> {size['final']:,} bytes "
                          f"({size['fp32'] / size['final']:.2f}x smaller)"))
    if rec.get("budget"):
        b = rec["budget"]
        limits = [f"latency {b['latency_ratio']:.3f}x of fp32"
                  + (f" (<= {b['max_latency_ratio']:.3f}x)" if b["max_latency_ratio"] else "")]
        if b["max_size_bytes"]:
            limits.append(f"size {b['size_bytes']:,} <= {b['max_size_bytes']:,} bytes")
        lines.append(Text("budget met: " + ", ".join(limits)))
    return Group(*parts, *lines)


def haq_view(record: dict[str, Any]) -> Group:
    """Terminal view of a `quant.haq` record: the policy per layer, latency against the budget, accuracy."""
    budget = record["search_budget"]
    unit = "ms (table)" if budget["resource"] == "latency_ms" else "bytes"
    t = Table(title=f"HAQ policy (cost in {unit})")
    for col in ("layer", "precision", "bits w/a", "cost", "cost is", "exported as"):
        t.add_column(col, justify="right" if col in ("bits w/a", "cost") else "left", overflow="fold")
    for r in record["rows"]:
        t.add_row(r["layer"], r["precision"], f"{r['weight_bits']}/{r['act_bits']}", f"{r['cost']:.4g}",
                  "measured" if r["measured"] else "modelled", r["exported_as"])
    lat, acc = record["latency"], record["accuracy"]
    met = "met" if budget["met"] else "NOT met"
    if budget["resource"] == "latency_ms":
        budget_line = (f"latency budget {budget['target']:.4g} ms ({budget['target'] / budget['original']:.2f}x fp32): "
                       f"{met}; predicted {lat['predicted_haq_ms']:.4g} ms")
    else:
        counted = record["counted_size_bytes"]
        budget_line = (f"size budget {budget['target']:,.0f} bytes: {met}, counted {counted['final']:,.0f} "
                       f"(fp32 {counted['fp32']:,.0f})")
    lines = [
        Text(budget_line),
        Text(f"measured interleaved: fp32 {lat['fp32_ms']:.4g} ms, uniform int8 {lat['uniform_int8_ms']:.4g} ms "
             f"({lat['uniform_int8_vs_fp32']:.2f}x), HAQ {lat['haq_ms']:.4g} ms ({lat['haq_vs_fp32']:.2f}x)"),
        Text(f"top-1 ({acc['split']}, ONNX Runtime): fp32 {100 * acc['fp32_top1']:.2f}%, uniform int8 "
             f"{100 * acc['uniform_int8_ptq_top1']:.2f}%, HAQ {100 * acc['haq_top1']:.2f}%"),
        Text(f"search: {len(record['episodes'])} episodes in {record['search_seconds']:.0f} s"),
    ]
    if record["simulated_layers"]:
        lines.append(Text(f"simulated (no kernel, weights on their bit grid, run as int8): "
                          f"{', '.join(record['simulated_layers'])}", style="yellow"))
    for p, why in record["unsupported_precisions"].items():
        lines.append(Text(f"{p}: not a choice here: {why}"))
    return Group(t, *lines)
