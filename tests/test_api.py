"""The public API a notebook calls: `squeeze.api.prune`, `squeeze.quantize`, `squeeze.compress`."""

import json
import subprocess
import sys

import pydantic
import pytest

import squeeze
from squeeze import api
from squeeze.errors import RecipeError


def test_import_squeeze_is_light():
    code = ("import sys, squeeze; squeeze.quantize, squeeze.compress; "
            "print('torch' in sys.modules, 'onnx' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == [
        "False", "False"]


def test_prune_from_code_writes_what_the_cli_writes(tmp_path):
    report = api.prune("zoo:digits-cnn", tmp_path / "out", method="uniform", macs=0.6,
                           measure={"repeat": 5, "warmup": 2, "min_repeat_ms": 2})
    assert report["recipe"] == "prune-uniform" and report["stages"][0]["method"] == "prune.uniform"
    assert report["final"]["macs"] <= 0.6 * report["original"]["macs"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["figure-layer-profile.png", "figure-layers.png", "model.onnx", "model.pt",
                                                                     "report.html", "report.json"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["macs_reduction"] == report["macs_reduction"]


def test_bad_method_and_options_fail_before_any_model_is_loaded(tmp_path):
    with pytest.raises(RecipeError, match=r"Unknown method `prune.magic`.*prune.netadapt"):
        api.prune("zoo:digits-cnn", tmp_path / "a", method="magic", macs=0.5)
    with pytest.raises(pydantic.ValidationError, match="round_to"):
        api.prune("zoo:digits-cnn", tmp_path / "b", method="uniform", macs=0.5, options={"round_to": 0})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_fine_tune_budget_given_in_steps_replaces_the_default_in_epochs():
    netadapt = api.get_pass("prune.netadapt")  # long_term defaults to epochs
    options = api.method_options(netadapt, {"long_term.iterations": 3})
    assert "epochs" not in options["long_term"] and options["long_term"]["iterations"] == 3
    assert netadapt.Options.model_validate(options).long_term.iterations == 3
    both = api.method_options(netadapt, {"long_term.iterations": 3, "long_term.epochs": 2})  # the user's own: both
    with pytest.raises(ValueError, match="exactly one"):
        netadapt.Options.model_validate(both)


def test_quantize_and_compress_are_the_api_s():
    assert squeeze.quantize is api.quantize and squeeze.compress is api.compress
    with pytest.raises(AttributeError):
        squeeze.no_such_function


def test_method_options_set_one_nested_value_and_keep_the_method_s_defaults():
    netadapt, uniform = api.get_pass("prune.netadapt"), api.get_pass("prune.uniform")
    options = api.method_options(netadapt, {"select": "accuracy", "short_term.iterations": 50})
    assert options == {"select": "accuracy", "short_term": {"optimizer": "sgd", "lr": 0.001, "iterations": 50}}
    assert netadapt.Options.model_validate(options).short_term.iterations == 50
    assert api.option_default(netadapt, "short_term.iterations") == 100 and api.option_default(uniform, "round_to") == 8
    with pytest.raises(KeyError):
        api.option_default(netadapt, "short_term.nope")
    with pytest.raises(api.UnknownOptionError, match="`select` is not an option of prune.uniform") as exc:
        api.method_options(uniform, {"select": "accuracy"})
    assert exc.value.key == "select" and "min_ratio" in exc.value.accepted
    assert [m.name for m in api.methods("quant")] == sorted(m.name for m in api.methods("quant"))
    assert {"prune.netadapt", "prune.uniform"} <= {m.name for m in api.methods("prune")}


def test_prune_and_quantize_refuse_what_they_can_before_any_work(tmp_path, monkeypatch):
    from squeeze.quant.run import MissingCalibrationDataError

    monkeypatch.setattr(api, "run_recipe", lambda recipe, *args, **kwargs: recipe)  # the recipe each would run
    recipe = api.quantize("zoo:digits-cnn", tmp_path, method="qat", data="digits", options={"fine_tune": {"epochs": 1}})
    assert recipe.name == "quantize-qat" and recipe.stages[0].options == {"fine_tune": {"epochs": 1}}
    assert api.prune("zoo:digits-cnn", tmp_path, method="uniform", macs=0.5).name == "prune-uniform"
    with pytest.raises(MissingCalibrationDataError, match="needs calibration data"):
        api.quantize("zoo:digits-cnn", tmp_path)
    with pytest.raises(api.SqueezeError, match="Unknown importance criterion 'magic'"):
        api.prune("zoo:digits-cnn", tmp_path, macs=0.5, options={"importance": "magic"})


def test_catalog_lists_each_kind_and_names_the_kinds_on_an_unknown_one():
    assert ("prune.netadapt", api.get_pass("prune.netadapt").summary) in api.catalog("methods")
    assert "host-cpu" in dict(api.catalog("targets"))
    with pytest.raises(api.SqueezeError, match="Cannot list `bogus`"):
        api.catalog("bogus")


def _latency(original_ms: float) -> dict:
    return {"original": {"stats": {"median_ms": original_ms}}, "final": {"stats": {"median_ms": 0.5 * original_ms}},
            "speedup": {"ratio": 2.0, "low": 1.9, "high": 2.1}}


@pytest.mark.parametrize("original_ms, warned", [(0.11, False), (0.155, True)])
def test_a_verdict_taken_on_a_contended_machine_says_so(original_ms, warned):
    """The search saw the original at 0.1 ms at best: a final comparison where it took 0.155 ms was contended."""
    stages = [{"method": "prune.netadapt", "record": {"original_fastest_ms": 0.1}}]
    latency = _latency(original_ms)
    api._note_contention(latency, stages, "zoo:fashion-cnn")
    assert latency["contention"] == pytest.approx(original_ms / 0.1)
    assert ("warning" in latency) == warned
    if warned:
        assert latency["warning"].startswith("the machine ran 1.55x slower as the result was compared with the "
                                             "original than at its quietest in the search")
        assert "squeeze bench zoo:fashion-cnn OUT/model.onnx" in latency["warning"]
    # No search measured the original (a MACs budget, a quantization): nothing to tell contention by.
    counted = _latency(original_ms)
    api._note_contention(counted, [{"method": "prune.uniform", "record": {"budget": {}}}], "zoo:fashion-cnn")
    assert "contention" not in counted and "warning" not in counted
