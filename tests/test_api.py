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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.onnx", "model.pt", "report.json"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["macs_reduction"] == report["macs_reduction"]


def test_bad_method_and_options_fail_before_any_model_is_loaded(tmp_path):
    with pytest.raises(RecipeError, match=r"Unknown method `prune.magic`.*prune.netadapt"):
        api.prune("zoo:digits-cnn", tmp_path / "a", method="magic", macs=0.5)
    with pytest.raises(pydantic.ValidationError, match="round_to"):
        api.prune("zoo:digits-cnn", tmp_path / "b", method="uniform", macs=0.5, options={"round_to": 0})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_quantize_and_compress_are_the_api_s():
    assert squeeze.quantize is api.quantize and squeeze.compress is api.compress
    with pytest.raises(AttributeError):
        squeeze.no_such_function
