"""Preprocessing is explicit: --normalize / --resize, recorded in checkpoints and reports, reused on reload, and a
model fed the wrong way is called out instead of being credited with a gain.

The end-to-end tests train a small model the way a user would, with (x - 0.5) / 0.5 on [0, 1] pixels (a few
seconds), and prune it with a MACs budget (counted, not measured) and a one-epoch fine-tune.
"""

import json
import sys
from types import SimpleNamespace

import pytest
import torch
from test_cli import assert_clean_error
from typer.testing import CliRunner

from squeeze import api
from squeeze.cli.app import app
from squeeze.data import load_data
from squeeze.errors import DataError, RecipeError
from squeeze.model.loading import load_model, save_checkpoint
from squeeze.preprocessing import Preprocessing, from_flags, parse_normalize, parse_resize
from squeeze.recipe import load_recipe
from squeeze.report.render import _accuracy_lines

USER_NET = '''
from torch import nn


def digits_net():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
'''
USER_MODULE = "squeeze_test_user_net"
PRUNE = ["--method", "uniform", "--macs", "0.7x", "--round-to", "4", "--long-term-epochs", "1"]
# A short, cheap measurement: these tests are about accuracy, not latency.
EXPORT_ONLY = """name: export-only
stages:
  - method: export.onnx
measure: {repeat: 3, warmup: 1, min_repeat_ms: 1}
"""


def flat(text: str) -> str:
    """Terminal output with rich's line wrapping undone."""
    return " ".join(text.split())


# --- the spec and its text forms -------------------------------------------------------------------


@pytest.mark.parametrize("text, mean, std", [
    ("0.5,0.5", (0.5,), (0.5,)),
    ("0.5:0.25", (0.5,), (0.25,)),
    ("0.485,0.456,0.406:0.229,0.224,0.225", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ("0.1,0.2,0.3:0.5", (0.1, 0.2, 0.3), (0.5, 0.5, 0.5)),
    (" -1e-1 , 2 ", (-0.1,), (2.0,)),
])
def test_normalize_values(text, mean, std):
    assert parse_normalize(text) == Preprocessing(normalize="values", mean=mean, std=std)


@pytest.mark.parametrize("text", ["data", "ImageNet", "none"])
def test_normalize_names(text):
    pre = parse_normalize(text)
    assert pre.normalize == text.lower() and pre.mean is None and pre.resize is None


def test_resize_modes():
    assert [parse_resize(m).resize for m in ("bilinear", "Bicubic", "nearest", "none")] == \
        ["bilinear", "bicubic", "nearest", "none"]
    with pytest.raises(DataError, match="bilinear, bicubic, nearest, none"):
        parse_resize("lanczos")


def test_over_layers_specs_and_normalize_travels_with_its_values():
    recorded = Preprocessing(normalize="values", mean=(0.5,), std=(0.5,), resize="bicubic")
    # Asking for `data` drops the recorded values (they are recomputed), and keeps the recorded resize.
    assert parse_normalize("data").over(recorded) == Preprocessing(normalize="data", resize="bicubic")
    assert parse_resize("nearest").over(recorded) == recorded.model_copy(update={"resize": "nearest"})
    assert Preprocessing().over(recorded) == recorded and not Preprocessing().given
    assert from_flags("0.5,0.5", "none") == Preprocessing(normalize="values", mean=(0.5,), std=(0.5,), resize="none")


def test_digits_resize_modes():
    nearest = load_data("digits", preprocessing=from_flags("none", "nearest")).train.tensors[0]
    # 8x8 -> 16x16 nearest: every source pixel becomes a 2x2 block.
    torch.testing.assert_close(nearest[:, :, ::2, ::2], nearest[:, :, 1::2, 1::2])
    bicubic = load_data("digits", preprocessing=from_flags("none", "bicubic")).train.tensors[0]
    assert float(bicubic.min()) >= 0.0 and float(bicubic.max()) <= 1.0  # clamped like PIL
    assert not torch.equal(bicubic, nearest)
    native = load_data("digits", input_shape=(1, 1, 8, 8), preprocessing=from_flags(None, "none"))
    assert native.input_shape == (1, 1, 8, 8) and native.preprocessing.resize == "none"
    with pytest.raises(DataError, match="The digits: the images are 8x8, the model takes 16x16, and --resize none"):
        load_data("digits", preprocessing=from_flags(None, "none"))


def test_recipe_data_section(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(EXPORT_ONLY + "data: {spec: digits, normalize: '0.5,0.5', resize: nearest}\n")
    section = load_recipe(str(path)).data
    assert section.spec == "digits"
    assert section.preprocessing() == from_flags("0.5,0.5", "nearest")
    path.write_text(EXPORT_ONLY + "data: digits\n")
    assert load_recipe(str(path)).data.preprocessing() == Preprocessing()
    path.write_text(EXPORT_ONLY + "data:\n  spec: digits\n  normalize: half\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(str(path))
    assert "r.yaml:7" in str(info.value) and "data.normalize" in str(info.value)
    assert "M1,M2,M3:S1,S2,S3" in str(info.value)


# --- the checkpoint records it ---------------------------------------------------------------------


def test_preprocessing_round_trips_through_the_checkpoint(tmp_path):
    model = load_model("zoo:digits-cnn")
    assert model.preprocessing is None
    save_checkpoint(tmp_path / "plain.pt", model)
    assert load_model(str(tmp_path / "plain.pt")).preprocessing is None

    pre = load_data("digits", preprocessing=parse_normalize("0.5,0.5")).preprocessing
    model.preprocessing = pre
    save_checkpoint(tmp_path / "recorded.pt", model)
    raw = torch.load(tmp_path / "recorded.pt", weights_only=True)  # plain data: no class is unpickled
    assert raw["preprocessing"] == {"normalize": "values", "mean": [0.5], "std": [0.5], "resize": "bilinear"}
    assert load_model(str(tmp_path / "recorded.pt")).preprocessing == pre


# --- the near-chance and gain guards ---------------------------------------------------------------


def _data(num_classes=10):
    return SimpleNamespace(spec="digits", num_classes=num_classes,
                           preprocessing=Preprocessing(normalize="none", mean=(0.0,), std=(1.0,), resize="bilinear"))


def test_near_chance_threshold_is_one_and_a_half_times_chance():
    assert api._near_chance_warning(0.16, _data()) is None
    warning = api._near_chance_warning(0.15, _data())
    assert "near chance (10% for 10 classes)" in warning and "--normalize" in warning
    assert "preprocessing (normalize none (mean 0, std 1), resize bilinear) or the labels are probably wrong" in warning
    assert api._near_chance_warning(0.76, _data(num_classes=2)) is None
    assert api._near_chance_warning(0.75, _data(num_classes=2)) is not None


def test_accuracy_lines_never_show_a_gain_over_a_misfed_original():
    normal = {"n": 360, "split": "test", "delta_pt": 0.5, "warning": None}
    assert [t.plain for t in _accuracy_lines(normal)] == ["accuracy change +0.50 pt on 360 test images"]
    near_chance = {**normal, "delta_pt": None, "warning": "the original scores 10.0% top-1"}
    lines = [t.plain for t in _accuracy_lines(near_chance)]
    assert lines[0] == "warning: the original scores 10.0% top-1"
    assert "not shown" in lines[1] and "+" not in " ".join(lines)
    gain = {**normal, "delta_pt": 53.33, "warning": api._gain_warning(53.33, _data())}
    lines = [t.plain for t in _accuracy_lines(gain)]
    assert "+53.3 pt above the original" in lines[0] and "--normalize" in lines[0]
    assert lines[1] == "accuracy change +53.33 pt: not a gain from compression (see the warning)"


# --- end to end: a model trained with (x - 0.5) / 0.5 ---------------------------------------------


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """`squeeze_test_user_net:digits_net` and its weights, trained on the digits train split with (x - 0.5) / 0.5."""
    folder = tmp_path_factory.mktemp("user")
    (folder / f"{USER_MODULE}.py").write_text(USER_NET)
    sys.path.insert(0, str(folder))
    from squeeze_test_user_net import digits_net

    x, y = load_data("digits", preprocessing=parse_normalize("0.5,0.5")).train.tensors
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = digits_net()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _epoch in range(15):
            order = torch.randperm(len(x))
            for i in range(0, len(x), 64):
                batch = order[i:i + 64]
                loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    weights = folder / "weights.pt"
    torch.save(model.eval().state_dict(), weights)
    yield ["squeeze_test_user_net:digits_net", "--weights", str(weights), "--input-shape", "1,1,16,16"]
    sys.path.remove(str(folder))


def _run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return r


@pytest.fixture(scope="module")
def pruned_right(user_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("right") / "out"
    r = _run("prune", *user_model, *PRUNE, "--data", "digits", "--normalize", "0.5,0.5", "--out", out)
    return out, r, json.loads((out / "report.json").read_text())


def test_given_normalization_keeps_the_accuracy_through_pruning(pruned_right):
    out, r, rep = pruned_right
    acc = rep["accuracy"]
    assert acc["original_top1"] >= 0.9 and acc["final_top1"] >= acc["original_top1"] - 0.05
    assert acc["warning"] is None and not acc["original_near_chance"]
    assert rep["data"]["preprocessing"] == {"normalize": "values", "mean": [0.5], "std": [0.5], "resize": "bilinear"}
    assert rep["data"]["preprocessing_source"] == "given"
    assert "data digits: normalize values (mean 0.5, std 0.5), resize bilinear (as given)" in flat(r.stdout)
    assert load_model(str(out / "model.pt")).preprocessing == Preprocessing.model_validate(rep["data"]["preprocessing"])


def test_a_pruned_checkpoint_is_fed_as_it_recorded(pruned_right, tmp_path):
    out, _, rep = pruned_right
    recipe = tmp_path / "export.yaml"
    recipe.write_text(EXPORT_ONLY)
    r = _run("run", recipe, out / "model.pt", "--data", "digits", "--out", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["data"]["preprocessing"] == rep["data"]["preprocessing"]
    assert again["data"]["preprocessing_source"] == "model"
    assert again["accuracy"]["original_top1"] == pytest.approx(rep["accuracy"]["final_top1"], abs=0.01)
    assert "(as the model's checkpoint recorded)" in flat(r.stdout)


def test_without_normalize_the_default_is_named(user_model, tmp_path):
    recipe = tmp_path / "export.yaml"
    recipe.write_text(EXPORT_ONLY)
    r = _run("run", recipe, *user_model, "--data", "digits", "--out", tmp_path / "out")
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["data"]["preprocessing_source"] == "default" and rep["data"]["preprocessing"]["normalize"] == "data"
    assert "squeeze's default; the model records none: pass --normalize" in flat(r.stdout)
    # Fed the split's own statistics instead of (x - 0.5) / 0.5, it loses accuracy it has with its own.
    assert rep["accuracy"]["original_top1"] < 0.85


def test_a_misfed_original_is_flagged_and_no_gain_is_printed(user_model, tmp_path):
    r = _run("prune", *user_model, *PRUNE, "--data", "digits", "--normalize", "none", "--out", tmp_path / "out")
    acc = json.loads((tmp_path / "out" / "report.json").read_text())["accuracy"]
    assert acc["original_top1"] <= 0.15 and acc["original_near_chance"] and acc["delta_pt"] is None
    warning = "the preprocessing (normalize none (mean 0, std 1), resize bilinear) or the labels are probably wrong"
    assert warning in acc["warning"] and warning in flat(r.stdout) and warning in flat(r.stderr)
    assert "accuracy change not shown" in flat(r.stdout) and "accuracy change +" not in flat(r.stdout)


# --- bad values ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["prune", "quantize", "run"])
def test_bad_normalize_is_a_clean_error(cli, command, tmp_path, model_file):
    args = {"prune": ["prune", model_file, "--macs", "0.5x"], "quantize": ["quantize", model_file],
            "run": ["run", "bench-host", model_file]}[command]
    r = cli(*args, "--data", "digits", "--normalize", "0.5;0.5", "--out", tmp_path / "out")
    assert_clean_error(r, "--normalize `0.5;0.5` is not a normalization")
    assert "MEAN,STD" in r.stderr and "M1,M2,M3:S1,S2,S3" in r.stderr and "imagenet" in r.stderr
    assert not (tmp_path / "out").exists()


def test_normalize_without_data_is_refused(cli, tmp_path, model_file):
    r = cli("prune", model_file, "--macs", "0.5x", "--normalize", "0.5,0.5", "--out", tmp_path / "out")
    assert_clean_error(r, "no data is given")
