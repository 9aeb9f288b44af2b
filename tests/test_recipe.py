import subprocess
import sys

import pytest

from squeeze.errors import RecipeError
from squeeze.methods import list_passes
from squeeze.recipe import load_recipe


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
