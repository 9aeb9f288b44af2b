"""`squeeze prune` and prune stages in `squeeze run`, end to end in-process: outputs, numbers, bad inputs.

Budgets here are MACs (counted, not measured), so the numbers are exact and the searches short.
"""

import json
import re
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import file_digest
from test_cli import assert_clean_error
from typer.testing import CliRunner

from squeeze.cli.app import app
from squeeze.data import load_data
from squeeze.model.loading import load_model

DIGITS_MACS = 5_936_384
DIGITS_PARAMS = 135_674
FAST_PRUNE = ["--long-term-epochs", "1", "--short-term-iters", "5"]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """`squeeze prune zoo:digits-cnn --macs 0.6x --data digits`, run once for the tests that read its outputs."""
    out = tmp_path_factory.mktemp("pruned") / "out"
    r = CliRunner().invoke(app, ["prune", "zoo:digits-cnn", "--macs", "0.6x", "--data", "digits", "--out", str(out),
                                 *FAST_PRUNE])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return {"out": out, "stdout": r.stdout, "report": json.loads((out / "report.json").read_text())}


# --- a successful prune ----------------------------------------------------------------------------


def test_prune_writes_model_onnx_and_report(pruned):
    out, rep = pruned["out"], pruned["report"]
    assert sorted(p.name for p in out.iterdir()) == ["figure-layer-profile.png", "figure-layers.png", "figure-tradeoff.png",
                                                     "model.onnx", "model.pt", "report.html", "report.json"]
    assert rep["recipe"] == "prune-netadapt" and rep["model"] == "zoo:digits-cnn" and rep["target"] == "host-cpu"
    (stage,) = rep["stages"]
    rec = stage["record"]
    assert stage["method"] == "prune.netadapt" and rec["search"] == "netadapt" and rec["latency_source"] == "counted"
    assert rec["budget"] == {"resource": "macs", "original": DIGITS_MACS, "target": pytest.approx(0.6 * DIGITS_MACS)}
    # MACs: counted on the final model, within budget, and the reduction is their ratio.
    assert rep["original"]["macs"] == DIGITS_MACS
    assert rep["final"]["macs"] == rec["final_measured"] == rec["history"][-1]["resource"] <= rec["budget"]["target"]
    assert rep["macs_reduction"] == pytest.approx(DIGITS_MACS / rep["final"]["macs"]) and rep["macs_reduction"] >= 1 / 0.6
    assert rep["final"]["params"] < rep["original"]["params"] == DIGITS_PARAMS
    # Widths: [before, after] per prunable layer, on the 8-channel grid, and the plan keeps exactly those.
    assert set(rec["widths"]) == {"conv1.0", "conv2.0", "conv3.0", "conv5.0"}
    assert all(after % 8 == 0 and after <= before for before, after in rec["widths"].values())
    assert rec["plan"]["keep"] == {n: a for n, (b, a) in rec["widths"].items() if a < b} != {}
    assert all(h["resource"] <= h["target"] for h in rec["history"])


def test_prune_report_measures_accuracy_and_latency(pruned):
    rep = pruned["report"]
    acc = rep["accuracy"]
    assert acc["split"] == "test" and acc["n"] == rep["data"]["test_size"] == 360
    assert acc["original_top1"] > 0.9 and 0 <= acc["final_top1"] <= 1
    assert acc["delta_pt"] == pytest.approx(100 * (acc["final_top1"] - acc["original_top1"]))
    lat = rep["latency"]
    assert lat["original"]["stats"]["median_ms"] > 0 and lat["final"]["stats"]["median_ms"] > 0
    assert lat["original"]["run_id"] == lat["final"]["run_id"]  # one interleaved run
    sp = lat["speedup"]
    assert sp["low"] <= sp["ratio"] <= sp["high"] and sp["confidence"] == 0.95
    assert rep["artifact"]["parity"]["passed"]
    assert "measured speedup" in pruned["stdout"] and "MACs reduction" in pruned["stdout"]


def test_pruned_onnx_computes_what_the_checkpoint_computes(pruned):
    out = pruned["out"]
    model = load_model(str(out / "model.pt"))
    assert model.kind == "checkpoint" and model.plans == [pruned["report"]["stages"][0]["record"]["plan"]]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    data = load_data("digits", input_shape=model.input_shape)
    x = torch.stack([data.test[i][0] for i in range(8)])  # (8, 1, 16, 16)
    (onnx_out,) = session.run(None, {name: x.numpy()})
    with torch.no_grad():
        torch_out = model.module(x).numpy()
    assert onnx_out.shape == (8, 10)
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=1e-3)


def test_info_on_the_pruned_checkpoint(cli, pruned):
    r = cli("info", pruned["out"] / "model.pt", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    final = pruned["report"]["final"]
    assert (d["params"], d["macs"]) == (final["params"], final["macs"])
    assert d["params"] < DIGITS_PARAMS and d["input_shape"] == [1, 1, 16, 16]
    table = cli("info", pruned["out"] / "model.pt")
    assert table.exit_code == 0 and "conv5.0" in table.stdout


def test_bench_pruned_against_the_original(cli, pruned, tmp_path, fast):
    res = tmp_path / "bench.json"
    r = cli("bench", pruned["out"] / "model.pt", "zoo:digits-cnn", *fast, "--json", res)
    assert r.exit_code == 0, r.stderr
    a, b = json.loads(res.read_text())["models"]
    assert a["macs"] == pruned["report"]["final"]["macs"] and b["macs"] == DIGITS_MACS
    assert a["measurement"]["run_id"] == b["measurement"]["run_id"] and b["speedup_vs_first"]["ratio"] > 0


# --- bad inputs: exit 2, one paragraph, nothing written, the input file untouched -----------------


@pytest.mark.parametrize("args, needles", [
    (["--method", "magic", "--macs", "0.6x"], ["Unknown pruning method `magic`", "netadapt, uniform"]),
    ([], ["No budget given", "--macs 0.5x"]),
    (["--macs", "half"], ["--macs `half` is not a ratio", "0.5x, 0.5 or 50%"]),
    (["--macs", "0.6x", "--importance", "taylor"], ["The taylor importance needs data", "--data"]),
    (["--macs", "0.6x", "--importance", "magic"], ["Unknown importance criterion 'magic'", "bn_scale, l1, l2, taylor"]),
    (["--macs", "0.6x", "--data", "nope"], ["Unknown --data `nope`", "`digits`"]),
    (["--macs", "1x"], ["The budget (macs <= 5.936e+06) is already met by the original model (5.936e+06)"]),
    (["--size-bytes", "10000000"], ["size_bytes <= 1e+07) is already met"]),
    (["--macs", "0.001x"], ["NetAdapt cannot meet macs <= 5936", "counts 0.0419x of the original",
                            "Use --macs 0.05x or more"]),
    (["--macs", "0.1%", "--method", "uniform"], ["Uniform pruning cannot meet macs <= 5936",
                                                 "(every layer at keep ratio 0.05) counts 0.0419x"]),
], ids=["method", "no-budget", "ratio-text", "taylor-no-data", "importance", "data", "already-met", "size-met",
        "netadapt-impossible", "uniform-impossible"])
def test_bad_prune_inputs(cli, model_file, tmp_path, args, needles):
    before = file_digest(model_file)
    out = tmp_path / "out"
    assert_clean_error(cli("prune", model_file, "--out", out, *args), *needles)
    assert not out.exists()
    assert file_digest(model_file) == before


@pytest.mark.parametrize("method", ["netadapt", "uniform"])
def test_an_impossible_latency_budget_fails_in_seconds_with_the_measured_floor(cli, model_file, tmp_path, method):
    # model_file: the zoo model is trained (once per run) before the clock starts. Without the check up front
    # this ran NetAdapt for more than 10 minutes before giving up.
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = cli("prune", "zoo:digits-cnn", "--latency", "0.001x", "--method", method, "--data", "digits", "--out", out)
    elapsed_s = time.perf_counter() - t0
    assert_clean_error(r, "cannot meet latency_ms <=", "(0.001x of the original)", "the smallest allowed model")
    floor = float(re.search(r"measures (\S+)x of the original", r.stderr).group(1))
    nearest = float(re.search(r"Use --latency (\S+)x \(--latency-ms \S+\) or more", r.stderr).group(1))
    assert 0.001 < floor < nearest < 1
    assert elapsed_s < 60
    assert not out.exists()


@pytest.mark.parametrize("args, bad", [
    (["--macs", "1.5x"], "1.5x"),
    (["--macs", "0.6x", "--select", "best"], "best"),
    (["--macs", "0.6x", "--latency-source", "magic"], "magic"),
], ids=["ratio-above-1", "select", "latency-source"])
def test_bad_option_values_are_user_errors(cli, tmp_path, args, bad):
    r = cli("prune", "zoo:digits-cnn", "--out", tmp_path / "out", *args)
    assert_clean_error(r, bad)
    assert "internal error" not in r.stderr


def test_unknown_importance_is_reported_before_loading_the_model(cli, tmp_path):
    r = cli("prune", tmp_path / "missing.pt", "--macs", "0.6x", "--importance", "magic", "--out", tmp_path / "out")
    assert_clean_error(r, "Unknown importance criterion 'magic'")


# --- prune stages in recipes -----------------------------------------------------------------------

NETADAPT_RECIPE = """\
name: prune-digits
budget: {macs_ratio: 0.7}
data: digits
stages:
  - method: prune.netadapt
    options:
      round_to: 8
      initial_reduction: 0.1
      select: accuracy
      short_term: {optimizer: sgd, lr: 0.001, iterations: 5}
      long_term: {optimizer: sgd, lr: 0.01, epochs: 1}
export: {exporter: torchscript}
measure: {repeat: 5, warmup: 2, min_repeat_ms: 2}
"""


def test_run_recipe_with_a_netadapt_stage(cli, tmp_path):
    recipe = tmp_path / "prune.yaml"
    recipe.write_text(NETADAPT_RECIPE)
    out = tmp_path / "out"
    r = cli("run", recipe, "zoo:digits-cnn", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["figure-layer-profile.png", "figure-layers.png", "figure-tradeoff.png",
                                                     "model.onnx", "model.pt", "report.html", "report.json"]
    rep = json.loads((out / "report.json").read_text())
    (stage,) = rep["stages"]
    rec = stage["record"]
    assert stage["method"] == "prune.netadapt" and rep["data"]["spec"] == "digits"
    assert rec["budget"]["target"] == pytest.approx(0.7 * DIGITS_MACS)
    assert rep["final"]["macs"] == rec["final_measured"] <= rec["budget"]["target"]
    # The recipe's options reached the search: the first step is 10% of the original, not the default 2.5%.
    assert rec["history"][0]["target"] == pytest.approx(0.9 * DIGITS_MACS)
    assert all(h["accuracy"] is not None for h in rec["history"])
    assert rep["artifact"]["exporter"] == "torchscript" and rep["accuracy"]["split"] == "test"
    assert len(rep["latency"]["final"]["samples_ms"]) == 5
    assert load_model(str(out / "model.pt")).plans == [rec["plan"]]


BAD_RECIPES = {
    "top-level-option": ("      initial_reductoin: 0.05\n", ":6", "stages.0.options.initial_reductoin"),
    "nested-option": ("      short_term: {iters: 5}\n", ":6", "stages.0.options.short_term.iters"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_netadapt_option_names_the_key(cli, tmp_path, case):
    line, where, key = BAD_RECIPES[case]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nbudget: {macs_ratio: 0.7}\nstages:\n  - method: prune.netadapt\n    options:\n" + line)
    assert_clean_error(cli("validate", recipe), f"r.yaml{where}", key, "initial_reduction, decay, max_iterations")
    out = tmp_path / "out"
    assert_clean_error(cli("run", recipe, "zoo:digits-cnn", "--out", out), f"r.yaml{where}", key)
    assert not out.exists()


def test_out_of_range_budget_in_a_recipe(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nbudget: {macs_ratio: 1.5}\nstages:\n  - method: prune.uniform\n")
    assert_clean_error(cli("validate", recipe), "r.yaml:2", "budget.macs_ratio", "less than or equal to 1")


def test_validate_rejects_a_prune_recipe_without_budget(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\nstages:\n  - method: prune.netadapt\n")
    assert_clean_error(cli("validate", recipe), "budget")


def test_a_newly_registered_pruning_method_is_a_choice_of_squeeze_prune(cli, tmp_path, monkeypatch):
    """Registering `prune.<name>` is all it takes: `squeeze prune --method <name>` runs it, --help lists it and
    the defaults of its options, and --option reaches any option (no list to edit, no default restated)."""
    from typing import Literal

    from squeeze.errors import SqueezeError
    from squeeze.methods import Pass, list_passes
    from squeeze.methods.base import pass_registry
    from squeeze.methods.prune.uniform import UniformOptions

    class ToyOptions(UniformOptions):
        select: Literal["accuracy", "accuracy_per_latency"] = "accuracy_per_latency"

    class Toy(Pass):
        name = "prune.toy"
        summary = "a search that only says it ran"
        Options = ToyOptions
        needs_budget = True

        def run(self, state, ctx):
            o = self.options
            raise SqueezeError(f"the toy search ran with round_to {o.round_to}, min_ratio {o.min_ratio}, long-term "
                               f"lr {o.long_term.lr} for {o.long_term.epochs} epochs, select {o.select}.")

    monkeypatch.setitem(pass_registry._items, Toy.name, Toy)
    assert Toy in list_passes()
    r = cli("prune", "zoo:digits-cnn", "--method", "toy", "--macs", "0.5x", "--round-to", "4", "--option",
            "min_ratio=0.3", "--option", "long_term.epochs=3", "--out", tmp_path / "o")
    # The nested option keeps the rest of its default (lr 0.01); a flag not given leaves the method's default.
    assert r.exit_code == 2 and ("the toy search ran with round_to 4, min_ratio 0.3, long-term lr 0.01 for 3 epochs, "
                                 "select accuracy_per_latency.") in r.stderr
    names = ", ".join(p.name.removeprefix("prune.") for p in list_passes() if p.name.startswith("prune."))
    assert "netadapt, toy, uniform" in names
    r = cli("prune", "zoo:digits-cnn", "--method", "nope", "--macs", "0.5x", "--out", tmp_path / "o")
    assert r.exit_code == 2 and f"Choose one of: {names}." in r.stderr
    monkeypatch.setenv("COLUMNS", "1000")
    text = " ".join(cli("prune", "--help").stdout.replace("│", " ").split())
    assert f"A registered pruning search: {names} (squeeze list methods: prune.*)." in text
    assert ("netadapt, toy: accuracy or accuracy_per_latency (default accuracy for netadapt, accuracy_per_latency "
            "for toy).") in text
    assert "Widths are multiples of this (default 8)." in text


def test_method_flags_and_option_pairs_name_what_the_user_typed(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("prune", "zoo:digits-cnn", "--out", out, "--macs", "0.5x", "--method", "uniform", "--select", "accuracy")
    assert_clean_error(r, "--select does not apply to --method uniform", "Its options: importance, round_to")
    r = cli("prune", "zoo:digits-cnn", "--out", out, "--macs", "0.5x", "--option", "short_term.iterations=0")
    assert_clean_error(r, "--option short_term.iterations `0`: Input should be greater than or equal to 1")
    r = cli("prune", "zoo:digits-cnn", "--out", out, "--macs", "0.5x", "--option", "select")
    assert_clean_error(r, "--option `select` is not KEY=VALUE")
    r = cli("prune", "zoo:digits-cnn", "--out", out, "--macs", "0.5x", "--select", "accuracy", "--option",
            "select=accuracy")
    assert_clean_error(r, "--select and --option select both set `select`")
    assert not out.exists()


def test_episodes_is_a_flag_of_the_methods_that_have_episodes(cli, tmp_path):
    r = cli("prune", "zoo:digits-cnn", "--method", "netadapt", "--episodes", "3", "--macs", "0.5x",
            "--out", tmp_path / "o")
    assert r.exit_code == 2 and "--episodes" in r.stderr and not (tmp_path / "o").exists()


def test_json_dash_prints_only_the_report_and_a_json_file_keeps_the_tables(cli, tmp_path):
    r = cli("prune", "zoo:digits-cnn", "--method", "uniform", "--macs", "0.6x", "--data", "digits",
            "--long-term-epochs", "1", "--json", "-", "--out", tmp_path / "a")
    assert r.exit_code == 0, r.stderr
    printed = json.loads(r.stdout)  # stdout holds the JSON and nothing else
    assert printed["stages"][0]["method"] == "prune.uniform"
    written = printed.pop("written")  # the files, listed once they are in place
    assert printed == json.loads((tmp_path / "a" / "report.json").read_text())
    assert str(tmp_path / "a" / "report.json") in written
    r = cli("prune", "zoo:digits-cnn", "--method", "uniform", "--macs", "0.6x", "--data", "digits",
            "--long-term-epochs", "1", "--json", tmp_path / "r.json", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["recipe"] == "prune-uniform" and "MACs" in r.stdout


def test_an_unwritable_json_path_fails_before_any_work(cli, tmp_path):
    r = cli("prune", "zoo:digits-cnn", "--method", "uniform", "--macs", "0.6x", "--json", tmp_path,
            "--out", tmp_path / "out")
    assert r.exit_code == 2 and "--json" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
