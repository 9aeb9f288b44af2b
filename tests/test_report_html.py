"""Figures and report.html drawn from report.json: PNGs of the fixed size that are not blank, a page that needs
nothing from the network, the files written with every result, `squeeze report` rebuilding and comparing, and
its errors on folders that hold no readable report.

One real prune (uniform, with data: seconds) gives the written files; the searches' records (NetAdapt, AMC,
HAQ, int8) are small hand-written ones in the schema their reports have (checked against the real one).
"""

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from test_cli import assert_clean_error
from test_startup import run_fresh
from typer.testing import CliRunner

from squeeze.cli.app import app
from squeeze.report import figures
from squeeze.report.html import compare_html, report_files, report_html

LAYERS = ["conv1.0", "conv2.0", "conv3.0", "conv5.0"]


def _measurement(median_ms: float) -> dict:
    return {"artifact_sha256": "0" * 64, "target": "host-cpu", "run_id": "run-1", "cached": False,
            "protocol": {"warmup": 10, "repeat": 30, "min_repeat_ms": 20.0, "threads": 2, "batch_size": 1, "seed": 0},
            "stats": {"n": 30, "median_ms": median_ms, "p90_ms": 1.02 * median_ms, "mad_ms": 0.001},
            "samples_ms": [median_ms] * 30, "calls_per_sample": 256,
            "environment": {"runtime": "onnxruntime", "runtime_version": "1.32.0",
                            "providers": ["CPUExecutionProvider"], "threads": 2, "cpu": "AMD EPYC", "cpu_count": 2,
                            "cpu_int8": {"int8_isa": ["AVX2"], "int8_dot_product": False}, "load_avg_1m": 0.4}}


def _summary(params: int, macs: int) -> dict:
    return {"name": "digits-cnn", "kind": "zoo", "input_shape": [1, 1, 16, 16], "params": params, "macs": macs,
            "size_bytes": 4 * params, "onnx_bytes": 4 * params + 18000,
            "layers": [{"name": n, "type": "Conv2d", "output_shape": [1, 16, 8, 8], "params": params // 5,
                        "macs": macs // 5} for n in LAYERS]}


def _report(method: str, record: dict, model: str = "zoo:digits-cnn") -> dict:
    return {"recipe": method.replace(".", "-"), "model": model, "target": "host-cpu",
            "data": {"spec": "digits", "train_size": 1077, "val_size": 360, "test_size": 360, "num_classes": 10,
                     "input_shape": [1, 1, 16, 16], "preprocessing_source": "default",
                     "preprocessing": {"normalize": "data", "mean": [0.31], "std": [0.32], "resize": "bilinear"}},
            "original": _summary(135_674, 5_936_384), "final": _summary(30_618, 2_506_992),
            "latency": {"original": _measurement(0.26), "final": _measurement(0.16),
                        "speedup": {"ratio": 1.63, "low": 1.60, "high": 1.66, "confidence": 0.95, "n": 30,
                                    "method": "paired bootstrap of the median ratio"}},
            "accuracy": {"split": "test", "n": 360, "original_top1": 0.997, "final_top1": 0.983, "delta_pt": -1.4,
                         "original_near_chance": False, "warning": None},
            "measurements": {}, "stages": [{"method": method, "seconds": 12.5, "record": record}],
            "macs_reduction": 2.37}


def _iteration(i: int, layer: str, width_after: int, resource: float, accuracy: float | None,
               proposals: list[dict]) -> dict:
    return {"iteration": i, "target": resource * 1.01, "layer": layer, "width_before": 2 * width_after,
            "width_after": width_after, "resource": resource, "measured": None, "accuracy": accuracy,
            "proposals": proposals, "seconds": 3.0}


def _search(name: str, history: list[dict], **extra) -> dict:
    return {"search": name, "latency_source": "measured", "history": history, "final_measured": 0.155,
            "budget": {"resource": "latency_ms", "original": 0.26, "target": 0.159}, "budget_met": True,
            "search_seconds": 10.0, "widths": {"conv1.0": [16, 16], "conv2.0": [32, 32], "conv3.0": [64, 32],
                                               "conv5.0": [128, 24]},
            "not_pruned": {"fc": "its output is the model output (fc)"}, "plan": {"keep": {"conv3.0": 32}}, **extra}


def _proposal(layer: str, width: int, resource: float, accuracy: float) -> dict:
    return {"layer": layer, "width": width, "resource": resource, "accuracy": accuracy, "score": accuracy}


NETADAPT = _search("netadapt", [
    _iteration(0, "conv5.0", 96, 0.247, 0.994, [_proposal("conv1.0", 8, 0.248, 0.5),
                                                _proposal("conv3.0", 56, 0.244, 0.99),
                                                _proposal("conv5.0", 96, 0.247, 0.994)]),
    _iteration(1, "conv3.0", 32, 0.150, 0.48, [_proposal("conv1.0", 8, 0.141, 0.23),
                                               _proposal("conv3.0", 32, 0.150, 0.48),
                                               _proposal("conv5.0", 24, 0.153, 0.36)]),
])
AMC = _search("amc", [
    {**_iteration(e, "*", 0, 2.9e6 + 1e4 * (e % 3), 0.97 + 0.01 * (e % 3), [{"reward": 0.97 + 0.01 * (e % 3)}]),
     "width_before": 0} for e in range(8)],
    reward_curve=[0.97 + 0.01 * (e % 3) for e in range(8)], best_episode=2,
    selection=[{"episode": 2, "reward": 0.99, "rescored": 0.99, "widths": {}, "predicted": 2.92e6,
                "confirmed": 2.92e6, "chosen": True}])
AMC["budget"] = {"resource": "macs", "original": 5_936_384, "target": 2_968_192}
AMC["latency_source"] = "counted"
HAQ_LAYERS = ["conv1.0", "conv2.0", "conv3.0", "fc"]
HAQ_POLICY = ["fp32", "int8", "int8", "fp32"]
HAQ = {
    "layers": dict(zip(HAQ_LAYERS, HAQ_POLICY)),
    "search_budget": {"resource": "latency_ms", "original": 0.30, "target": 0.27, "met": True},
    "rows": [{"layer": n, "precision": p, "weight_bits": bits, "act_bits": bits, "cost": 0.02 if bits == 8 else 0.03,
              "measured": True, "exported_as": "QDQ int8" if bits == 8 else "float", "choices": ["fp32", "int8"]}
             for n, p in zip(HAQ_LAYERS, HAQ_POLICY) for bits in [8 if p == "int8" else 32]],
    "episodes": [{"episode": e, "reward": 0.1 * (e % 4) - 0.2, "actions": [0.5] * 4, "noise_sigma": None,
                  "critic_loss": None, "seconds": 1.0,
                  "info": {"policy": HAQ_POLICY if e == 5 else ["fp32"] * 4, "asked": HAQ_POLICY,
                           "cost": 0.10 + 0.003 * e, "accuracy": 99.0 + 0.1 * (e % 4)}} for e in range(10)],
    "cost_table": [{"layer": n, "key": f"{n}_{p}", "precision": p, "weight_bits": b, "act_bits": b,
                    "latency_ms": 0.03 if p == "fp32" else 0.02, "size_bytes": 640.0, "measured": True, "note": ""}
                   for n in HAQ_LAYERS for p, b in (("fp32", 32), ("int8", 8))],
    "accuracy": {"split": "test", "fp32_top1": 0.997}, "latency": {"fp32_ms": 0.30, "haq_ms": 0.26},
    "search_seconds": 20.0, "simulated_layers": [], "unsupported_precisions": {},
}


def _candidate(activation: str, reduce_range: bool, speedup: float, top1: float) -> dict:
    return {"activation_type": activation, "weight_type": "int8", "reduce_range": reduce_range,
            "label": f"a:{activation} w:int8",
            "speedup": {"ratio": speedup, "low": 0.9 * speedup, "high": 1.1 * speedup},
            "parity": {"top1": top1, "top1_agreement": 0.99, "snr_db": 30.0, "below_floor": []}}


INT8 = {
    "type_choice": {"measured_on": "host-cpu", "fp32_median_ms": 0.30, "by_measurement": True,
                    "candidates": [_candidate("uint8", False, 1.31, 0.983), _candidate("uint8", True, 1.32, 0.997),
                                   _candidate("int8", False, 0.69, 0.983)],
                    "chosen": {"activation_type": "uint8", "weight_type": "int8", "reduce_range": True}},
    "layers": {n: "int8" for n in LAYERS},
}

def _reparam_record() -> dict:
    """Rows from the record's own class, so the figures read the schema reparam really writes."""
    from squeeze.reparam.run import LayerChoice

    rows = [LayerChoice(n, 0.02, 0.012 if n != "conv2.0" else 0.025, 900_000, 460_000, 36_864, 18_944,
                        {"ratio": 0.97 if n != "conv2.0" else 1.02, "low": 0.95, "high": 0.99 if n != "conv2.0" else 1.04},
                        chosen=n != "conv2.0", reason="faster in the model" if n != "conv2.0" else "slower")
            for n in LAYERS[1:]]
    return {"method": "ghost", "spec": {"type": "ghost", "ratio": 2, "dw_size": 3}, "skipped": {"conv1.0": "stem"},
            "layers": [r.to_json() for r in rows], "fit_seconds": 1.5,
            "val_top1": {"original": 0.99, "initialised": 0.97}}


# What each record draws (HAQ under a latency budget: its cost table gives the per-layer latency too).
CASES = {
    "reparam.ghost": (_reparam_record(), {"figure-layers.png", "figure-layer-latency.png"}),
    "prune.netadapt": (NETADAPT, {"figure-tradeoff.png", "figure-layers.png"}),
    "prune.amc": (AMC, {"figure-tradeoff.png", "figure-layers.png", "figure-reward.png"}),
    "quant.haq": (HAQ, {"figure-tradeoff.png", "figure-layers.png", "figure-layer-latency.png", "figure-reward.png"}),
    "quant.int8": (INT8, {"figure-tradeoff.png", "figure-layers.png"}),
}
BENCH_ONLY = _report("export.onnx", {"exporter": "dynamo", "parity": {"max_abs_err": 1e-6, "passed": True}})


def _image(png: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(png))
    img.load()  # a truncated or corrupt PNG fails here
    return img


def _assert_figure(png: bytes) -> None:
    img = _image(png)
    assert img.format == "PNG" and img.size == (figures.WIDTH_PX, figures.HEIGHT_PX)
    assert np.asarray(img.convert("L"), dtype=float).std() > 10  # a blank (one-colour) image has 0


def _embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|iframe|object|embed)\b", page, re.I) and "@import" not in page


# --- the figures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CASES)
def test_figures_are_pngs_of_the_fixed_size_and_not_blank(method):
    record, expected = CASES[method]
    pngs = figures.render_all(_report(method, record))
    assert set(pngs) == expected
    for png in pngs.values():
        _assert_figure(png)


def test_a_report_without_search_data_has_no_figures():
    assert all(draw(BENCH_ONLY) is None for draw, _ in figures.FIGURES.values())
    assert figures.render_all(BENCH_ONLY) == {}


def test_per_layer_latency_only_from_per_layer_times():
    """HAQ under a size budget costs layers in bytes, and a pruning record holds no per-layer times: no figure."""
    by_size = {**HAQ, "search_budget": {**HAQ["search_budget"], "resource": "size_bytes"}}
    assert figures.layer_latency(_report("quant.haq", by_size)) is None
    assert figures.layer_latency(_report("prune.netadapt", NETADAPT)) is None
    assert figures.layers(_report("quant.haq", by_size)) is not None


@pytest.mark.parametrize("method, chosen", [
    ("prune.netadapt", (0.150, 48.0)),  # the last iteration's winner
    ("prune.amc", (2.92e6, 99.0)),  # the episode selection took
    ("quant.haq", (0.115, 99.1)),  # the episode whose policy was exported
    ("quant.int8", (0.30 / 1.32, 99.7)),  # the chosen types: fp32 median over their speedup
])
def test_every_candidate_is_plotted_and_the_chosen_one_marked(method, chosen):
    record, _ = CASES[method]
    found = figures.candidates(_report(method, record))
    n = {"prune.netadapt": 6, "prune.amc": 8, "quant.haq": 10, "quant.int8": 3}[method]
    assert len(found.points) == n
    (mark,) = [p for p in found.points if p.chosen]
    assert (mark.resource, mark.accuracy_pct) == pytest.approx(chosen)


def test_pareto_front():
    P = figures.Point
    pts = [P(1, 50), P(2, 40), P(2, 60), P(3, 55), P(4, 70), P(4, 65)]
    assert figures.pareto_front(pts) == [P(1, 50), P(2, 60), P(4, 70)]


# --- report.html ----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", CASES)
def test_report_html_is_self_contained_and_embeds_the_figures(method):
    report = _report(method, CASES[method][0])
    files = report_files(report)
    page = files["report.html"].decode()
    _assert_self_contained(page)
    assert sorted(_embedded_pngs(page)) == sorted(png for name, png in files.items() if name.endswith(".png"))
    assert "zoo:digits-cnn" in page and "1.630x [1.600, 1.660]" in page and "CPUExecutionProvider" in page
    listed = {"quant.haq": HAQ_LAYERS, "reparam.ghost": LAYERS[1:]}.get(method, LAYERS)  # reparam: the candidates
    for layer in listed:
        assert f"<td>{layer}</td>" in page


def test_every_string_from_the_report_is_escaped():
    evil = '<img src=x onerror="alert(1)">'
    record = {**NETADAPT, "widths": {evil: [16, 8]}, "not_pruned": {"fc": "<b>why</b>"}}
    page = report_html(_report("prune.netadapt", record, model=evil))
    assert evil not in page and "<b>" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page and "&lt;b&gt;why&lt;/b&gt;" in page


def test_a_report_without_figures_is_still_a_page():
    page = report_html(BENCH_ONLY)
    _assert_self_contained(page)
    assert _embedded_pngs(page) == [] and "export.onnx" in page and "protocol" in page


def test_compare_puts_both_results_side_by_side():
    a, b = _report("prune.netadapt", NETADAPT), _report("quant.int8", INT8)
    page = compare_html(a, b, ("out-a", "out-b"))
    _assert_self_contained(page)
    assert len(_embedded_pngs(page)) == 4 and "out-a" in page and "out-b" in page
    assert "prune-netadapt: zoo:digits-cnn on host-cpu" in page and "quant-int8: zoo:digits-cnn on host-cpu" in page


# --- written with every result, rebuilt by `squeeze report` -------------------------------------------


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A real `squeeze prune --method uniform --macs 0.6x --data digits` (one epoch of fine-tune)."""
    out = tmp_path_factory.mktemp("pruned") / "out"
    r = CliRunner().invoke(app, ["prune", "zoo:digits-cnn", "--method", "uniform", "--macs", "0.6x", "--data", "digits",
                                 "--long-term-epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return out


def test_the_hand_written_reports_have_the_real_schema(pruned):
    real = json.loads((pruned / "report.json").read_text())
    mine = _report("prune.netadapt", NETADAPT)
    assert set(mine) - {"measurements"} <= set(real)
    assert set(NETADAPT) <= set(real["stages"][0]["record"])
    for key in ("original", "final"):
        assert set(mine["latency"][key]) <= set(real["latency"][key])
        assert set(mine[key]) <= set(real[key])


def test_prune_writes_the_figures_and_report_html(pruned):
    drawn = ["figure-layers.png", "figure-layer-profile.png"]
    assert sorted(p.name for p in pruned.iterdir()) == sorted([*drawn, "model.onnx", "model.pt", "report.html",
                                                               "report.json"])
    for name in drawn:
        _assert_figure((pruned / name).read_bytes())
    page = (pruned / "report.html").read_text()
    _assert_self_contained(page)
    assert _embedded_pngs(page) == [(pruned / name).read_bytes() for name in drawn]
    assert "prune-uniform: zoo:digits-cnn on host-cpu" in page and "output channels per prunable layer" in page
    assert "time per layer in the runtime&#x27;s profile" in page


def test_the_runtime_profile_times_every_layer_of_both_models(pruned):
    """The dynamo-exported original and result, profiled by ONNX Runtime: every conv and linear layer of both is
    found, and each model's layers and the rest add up to its measured median (the shares' scale)."""
    rep = json.loads((pruned / "report.json").read_text())
    profile = rep["layer_profile"]
    assert profile["source"] == "onnxruntime profiler" and profile["runs"] > 0
    assert {r["layer"] for r in profile["layers"]} == {layer["name"] for layer in rep["original"]["layers"]
                                                       if layer["type"] in ("Conv2d", "Linear")}
    for key in ("original", "final"):
        times = [r[f"{key}_ms"] for r in profile["layers"]]
        assert all(t >= 0 for t in times) and sum(times) > 0  # ORT counts whole us: a tiny fc may read 0 on a fast CPU
        assert sum(times) + profile["other_ms"][key] == pytest.approx(rep["latency"][key]["stats"]["median_ms"])


PROFILE = {"source": "onnxruntime profiler", "runs": 20, "other_ms": {"original": 0.01, "final": 0.008},
           "layers": [{"layer": n, "original_ms": 0.05, "final_ms": 0.03} for n in LAYERS]}


def test_the_runtime_profile_draws_per_layer_time_and_a_runtime_without_one_says_so():
    rep = {**_report("prune.netadapt", NETADAPT), "layer_profile": PROFILE}
    _assert_figure(figures.render_all(rep)["figure-layer-profile.png"])
    page = report_html(rep)
    assert "time per layer in the runtime&#x27;s profile" in page and "<td>(no layer)</td>" in page
    all_charged = {**rep, "layer_profile": {**PROFILE, "other_ms": {"original": 0.0, "final": 0.0}}}
    assert "(no layer)" not in report_html(all_charged)
    skipped = {**rep, "layer_profile": {"skipped": "per-layer times come from ONNX Runtime's profiler, and "
                                                   "`host-tvm` runs tvm"}}
    assert "figure-layer-profile.png" not in figures.render_all(skipped)
    assert "No per-layer profile: per-layer times come from ONNX Runtime&#x27;s profiler" in report_html(skipped)


def test_squeeze_report_rebuilds_from_report_json(cli, pruned, tmp_path):
    folder = tmp_path / "result"
    folder.mkdir()
    shutil.copy(pruned / "report.json", folder)
    r = cli("report", folder)
    assert r.exit_code == 0, r.stderr
    drawn = ["figure-layer-profile.png", "figure-layers.png", "report.html"]
    assert sorted(p.name for p in folder.iterdir()) == [*drawn, "report.json"]
    for name in drawn:  # drawn from the report alone, so the same bytes
        assert (folder / name).read_bytes() == (pruned / name).read_bytes()
    assert cli("report", folder, "--out", tmp_path / "elsewhere").exit_code == 0
    assert (tmp_path / "elsewhere" / "report.html").read_bytes() == (pruned / "report.html").read_bytes()


def test_squeeze_report_compares_two_results(cli, pruned, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text(json.dumps(_report("prune.netadapt", NETADAPT)))
    r = cli("report", pruned, other, "--out", tmp_path / "cmp")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.html"]
    page = (tmp_path / "cmp" / "compare.html").read_text()
    _assert_self_contained(page)
    assert len(_embedded_pngs(page)) == 4 and str(pruned) in page and str(other) in page


def test_squeeze_report_does_not_import_torch(pruned, tmp_path):
    folder = tmp_path / "result"
    folder.mkdir()
    shutil.copy(pruned / "report.json", folder)
    result, stdout = run_fresh("report", str(folder))
    assert result == {"code": 0, "heavy": []} and "report.html" in stdout


def _folder_with(tmp_path, text: str | None):
    folder = tmp_path / "result"
    folder.mkdir()
    if text is not None:
        (folder / "report.json").write_text(text)
    return folder


@pytest.mark.parametrize("content, needles", [
    (None, ["holds no report.json, so it is not a squeeze result", "the --out of `squeeze prune`"]),
    ('{"recipe": "prune-uniform", "model": ', ["report.json is not valid JSON", "line 1, column 38",
                                               "Re-run the command that wrote it"]),
    ("[1, 2]", ["report.json is not a squeeze report: it lacks recipe, model, target"]),
    ('{"recipe": "x", "model": "m", "target": "t"}', ["it lacks original, final, latency, stages"]),
])
def test_bad_report_folders(cli, tmp_path, content, needles):
    folder = _folder_with(tmp_path, content)
    assert_clean_error(cli("report", folder), str(folder), *needles)
    assert sorted(p.name for p in folder.iterdir()) == ([] if content is None else ["report.json"])


def test_squeeze_report_bad_arguments(cli, pruned, tmp_path):
    assert_clean_error(cli("report", tmp_path / "missing"), "missing is not a folder (it does not exist)")
    (tmp_path / "file").write_text("x")
    assert_clean_error(cli("report", tmp_path / "file"), "file is not a folder.")
    assert_clean_error(cli("report", pruned, pruned), "Comparing two results writes compare.html", "--out FOLDER")
    assert_clean_error(cli("report", pruned, pruned, pruned, "--out", tmp_path / "c"),
                       "one result folder or two to compare, not 3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert_clean_error(cli("report", pruned, "--out", tmp_path / "full"), "already holds files (keep.txt)", "--force")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]


# --- in a browser -----------------------------------------------------------------------------------


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("install Chromium: apt-get install -y chromium")
    return found


def test_report_html_renders_in_headless_chromium(pruned, tmp_path):
    """The page as a browser draws it, offline: not blank, and the embedded figure's blue bars are on it (the
    page's own style has no blue, so they come from the decoded PNG)."""
    browser = _chromium()
    shot = tmp_path / "shot.png"
    # --no-sandbox: Chromium refuses to start as root with its sandbox; the page is our own file.
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'prof'}",
                        f"--screenshot={shot}", "--window-size=1000,1400", (pruned / "report.html").as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, 1400)
    pixels = np.asarray(img, dtype=int)
    assert pixels.std() > 10
    blue = np.abs(pixels - np.array([0x1F, 0x77, 0xB4])).sum(axis=2) < 30  # figures.RESULT
    assert blue.sum() > 1000


def test_a_contended_verdict_is_warned_of_in_the_page():
    rep = _report("prune.netadapt", NETADAPT)
    rep["latency"] = {**rep["latency"], "contention": 1.4, "warning": "the machine ran 1.40x slower <as> compared"}
    assert '<p class="warning">warning: the machine ran 1.40x slower &lt;as&gt; compared</p>' in report_html(rep)
