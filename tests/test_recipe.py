import json
import subprocess
import sys
from pathlib import Path

import pytest

from squeeze import api
from squeeze.errors import RecipeError
from squeeze.methods import list_passes
from squeeze.recipe import Budget, MeasureOverrides, Recipe, Stage, load_recipe, remaining_budget


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_shipped_recipe_validates():
    r = load_recipe("bench-host")
    assert [s.method for s in r.stages] == ["export.onnx", "measure.latency"]


def test_every_registered_pass_has_typed_options_and_summary():
    names = [p.name for p in list_passes()]
    assert {"export.onnx", "measure.latency"} <= set(names)
    for p in list_passes():
        assert p.summary and p.Options.model_config.get("extra") == "forbid"


def test_unknown_method_names_valid_choices(tmp_path):
    path = write(tmp_path, "name: x\nstages:\n  - method: export.onnx\n  - method: prune.magic\n")
    with pytest.raises(RecipeError, match=r"r.yaml:4: `stages.1.method`: .*unknown method `prune.magic`; valid methods: "
                                          r"export.onnx, measure.latency"):
        load_recipe(path)


def test_bad_stage_option_names_key_path_and_line(tmp_path):
    path = write(tmp_path, "name: x\nstages:\n  - method: measure.latency\n    options:\n      lable: final\n")
    with pytest.raises(RecipeError, match=r"r.yaml:5: `stages.0.options.lable`: Extra inputs.*options of `measure.latency`: label"):
        load_recipe(path)


@pytest.mark.parametrize("text,match", [
    ("name: x\nstages: []\n", r"`stages`: List should have at least 1 item"),
    ("name: x\nbudget: {}\nstages:\n  - method: export.onnx\n", r"`budget`: Value error, a budget needs at least one"),
    ("name: x\nbudget: {latency_ratio: 1.5}\nstages:\n  - method: export.onnx\n", r"`budget.latency_ratio`"),
    ("name: x\nstages:\n  - method: export.onnx\nexport: {exporter: tflite}\n", r"`export.exporter`"),
    ("- just\n- a list\n", r"must be a YAML mapping \(key: value\), not a list"),
    ("", r"recipe file .* is empty\. Write the recipe as a YAML mapping"),
    ("# nothing yet\n", r"is empty \(only comments\)"),
    ("name: [unclosed\n", r"not valid YAML"),
])
def test_invalid_recipes(tmp_path, text, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(write(tmp_path, text))


def test_missing_recipe_lists_shipped():
    with pytest.raises(RecipeError, match=r"No recipe file `nope.yaml`.*bench-host"):
        load_recipe("nope.yaml")


def test_validation_imports_no_torch():
    code = "import sys; from squeeze.recipe import load_recipe; load_recipe('bench-host'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


SHIPPED = sorted(p.stem for p in (Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_validates_and_lists(name, cli):
    r = cli("validate", name)
    assert r.exit_code == 0 and f"recipe `{name}`" in r.stdout
    assert name in [n for n, _ in api.catalog("recipes")]


def test_shipped_chains_declare_shares_and_leave_int8_the_rest():
    for name, shares in [("prune-quantize-host", [{"latency_ratio": 0.6}, None]),
                         ("prune-reparam-quantize-host", [{"latency_ratio": 0.7}, None, None])]:
        r = load_recipe(name)
        assert r.budget == Budget(latency_ratio=0.4) and r.stages[-1].method == "quant.int8"
        assert [s.budget.model_dump(exclude_none=True) if s.budget else None for s in r.stages] == shares
        assert [s.own_budget for s in r.stages] == [True] * (len(shares) - 1) + [False]


def test_the_arm_recipe_leaves_ghost_the_rest_and_without_a_board_says_how_to_add_one(tmp_path, cli, monkeypatch):
    r = load_recipe("prune-reparam-arm")
    assert (r.target, r.budget) == ("arm-a72", Budget(latency_ratio=0.5))
    assert [(s.method, s.own_budget) for s in r.stages] == [("prune.netadapt", True), ("reparam.ghost", False)]
    from squeeze.target import RPC_ENV

    for var in RPC_ENV:
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "out"
    r = cli("run", "prune-reparam-arm", "zoo:digits-cnn", "--data", "digits", "--out", out)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "runs on a board over TVM RPC, but no board is configured" in " ".join(r.stderr.split())
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_remaining_budget_divides_ratios_by_what_was_reached():
    left = remaining_budget(Budget(latency_ratio=0.4, macs_ratio=0.5, size_bytes=1000),
                            {"latency_ratio": 0.8, "macs_ratio": 0.4})
    assert left == Budget(latency_ratio=0.5, macs_ratio=1.0, size_bytes=1000)  # MACs already met: capped at 1


def test_stage_budget_stands_in_for_the_recipe_s_and_null_opts_out(tmp_path):
    own = load_recipe(write(tmp_path, "name: x\nstages:\n  - method: prune.uniform\n    budget: {macs_ratio: 0.5}\n"))
    assert own.budget is None and own.stages[0].budget == Budget(macs_ratio=0.5)
    with pytest.raises(RecipeError, match=r"prune.uniform need a `budget:`"):
        load_recipe(write(tmp_path, "name: x\nbudget: {macs_ratio: 0.5}\nstages:\n  - method: prune.uniform\n"
                                    "    budget: null\n"))
    with pytest.raises(RecipeError, match=r"r.yaml:4: `stages.0.budget.macs_ratio`"):
        load_recipe(write(tmp_path, "name: x\nstages:\n  - method: prune.uniform\n    budget: {macs_ratio: 2}\n"))


def test_a_stage_the_target_cannot_run_is_refused_by_validate(tmp_path, cli):
    path = write(tmp_path, "name: arm\ntarget: arm-a72\nbudget: {latency_ratio: 0.4}\nstages:\n"
                           "  - method: prune.uniform\n  - method: quant.int8\n")
    r = cli("validate", path)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "stage 1 (`quant.int8`) writes models for onnxruntime; target `arm-a72` runs `tvm`" in r.output


def test_later_stages_get_what_earlier_ones_left_of_one_budget(tmp_path):
    recipe = Recipe(name="twice", budget=Budget(macs_ratio=0.5), measure=MeasureOverrides(repeat=3, warmup=0),
                    stages=[Stage(method="prune.uniform", budget=Budget(macs_ratio=0.8)),
                            Stage(method="prune.uniform")])
    report = api.run_recipe(recipe, "zoo:digits-cnn", tmp_path / "out", api.ModelOptions())
    original_macs = report["original"]["macs"]
    first, second = report["stages"]
    assert (first["budget"], first["budget_from"]) == ({"macs_ratio": 0.8}, "stage")
    received_macs = second["record"]["budget"]["original"]  # counted on the first stage's output
    assert received_macs <= 0.8 * original_macs
    assert second["budget_from"] == "recipe"
    assert second["budget"]["macs_ratio"] == pytest.approx(0.5 * original_macs / received_macs)
    assert report["final"]["macs"] <= 0.5 * original_macs
    final_ratio = report["final"]["macs"] / original_macs
    assert report["budget"] == {"limits": {"macs_ratio": 0.5}, "final": {"macs_ratio": final_ratio}, "met": True,
                                "missed": []}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["budget"]["met"] is True


def test_a_resumed_run_must_have_the_same_stage_budgets():
    from squeeze.prune.resume import run_fingerprint

    def fingerprint(*stage_budgets):
        recipe = Recipe(name="x", budget=Budget(macs_ratio=0.5),
                        stages=[Stage(method="prune.uniform", **b) for b in stage_budgets])
        return run_fingerprint(recipe, "zoo:digits-cnn", None, None, "host-cpu", None, None)

    assert "stage budgets" not in fingerprint({})  # as before stages had budgets: saved progress still matches
    assert fingerprint({"budget": Budget(macs_ratio=0.8)}, {})["stage budgets"] == [{"macs_ratio": 0.8}, None]
    assert fingerprint({"budget": Budget(macs_ratio=0.8)}) != fingerprint({"budget": Budget(macs_ratio=0.7)})


def test_latency_left_is_the_ratio_measured_against_the_original(monkeypatch):
    from squeeze.methods import ModelState, PassContext

    monkeypatch.setattr(api, "_compare", lambda original, received, *args: {"speedup": {"ratio": 2.0}})
    state = ModelState(model=None, artifact="received.onnx")  # exported already: nothing to export again
    reached = api._reached(Budget(latency_ratio=0.4), None, "original.onnx", state,
                           PassContext(target=None, oracle=None, protocol=None, export=None))
    assert reached == {"latency_ratio": 0.5}
    assert remaining_budget(Budget(latency_ratio=0.4), reached) == Budget(latency_ratio=0.8)


def test_a_latency_budget_is_met_within_the_searches_tolerance_and_not_beyond():
    def verdict(ratio):
        return api._budget_met(Budget(latency_ratio=0.5), None, None, None, {"speedup": {"ratio": 1 / ratio}})

    assert verdict(0.509)["met"] and verdict(0.509)["latency_tolerance"] == 0.02  # as the searches claim it
    assert verdict(0.511)["missed"] == ["latency_ratio"]


def test_a_result_that_misses_the_recipe_s_budget_exits_1_with_its_files_written(tmp_path, cli):
    # the one stage's own looser budget is met; the recipe's, checked on the shipped result, is not
    path = write(tmp_path, "name: loose\nbudget: {macs_ratio: 0.5}\nmeasure: {repeat: 3, warmup: 0}\nstages:\n"
                           "  - method: prune.uniform\n    budget: {macs_ratio: 0.8}\n")
    r = cli("run", path, "zoo:digits-cnn", "--out", tmp_path / "out")
    assert r.exit_code == 1 and "Traceback" not in r.output
    message = " ".join(r.stderr.split())
    assert "budget missed: the result misses its budget: macs_ratio 0." in message and "> 0.5" in message
    assert f"written to {tmp_path / 'out'} for a look" in message
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["budget"]["met"] is False and report["budget"]["missed"] == ["macs_ratio"]
    assert 0.5 < report["budget"]["final"]["macs_ratio"] <= 0.8 and (tmp_path / "out" / "model.onnx").is_file()


def test_a_missed_recipe_budget_is_reported_and_warned(caplog):
    latency = {"final": {"stats": {"median_ms": 12.0}}, "speedup": {"ratio": 2.5}}  # final 0.4x of the original
    met = api._budget_met(Budget(latency_ratio=0.3, latency_ms=10), None, None, None, latency)
    assert met == {"limits": {"latency_ratio": 0.3, "latency_ms": 10.0},
                   "final": {"latency_ratio": 0.4, "latency_ms": 12.0}, "met": False,
                   "missed": ["latency_ms", "latency_ratio"], "latency_tolerance": 0.02}
    assert "misses the recipe's budget: latency_ms 12 > 10, latency_ratio 0.4 > 0.3" in caplog.text
