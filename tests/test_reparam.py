"""Ghost and Lego re-parameterization: the modules, their counts, the fits, the measured choice, the plan's replay,
and `squeeze reparam` end to end on the digits CNN."""

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from squeeze.errors import ModelLoadError
from squeeze.export.onnx import export_onnx
from squeeze.model.loading import LoadedModel, load_model
from squeeze.model.zoo.resnet import resnet50
from squeeze.prune.budget import BudgetError
from squeeze.reparam.fit import capture, fit_ghost, fit_lego, relative_error
from squeeze.reparam.modules import GhostConv2d, GhostSpec, LegoConv2d, LegoSpec, build_replacement, spec_from_key
from squeeze.reparam.plan import plan_json, replace_layers, replay_reparam_plan
from squeeze.reparam.run import LayerChoice, candidates, choose
from squeeze.methods.reparam.ghost import GhostOptions

from conftest import file_digest


def _macs(module: nn.Module, shape) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval()(torch.zeros(shape))
    return counter.get_total_flops() // 2


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- modules: shapes and counts --------------------------------------------------------------------------


@pytest.mark.parametrize("c, n, k, stride, s", [(32, 64, 3, 1, 2), (24, 50, 3, 2, 3), (16, 32, 1, 1, 4)])
def test_a_ghost_module_keeps_the_shape_and_costs_what_the_formula_says(c, n, k, stride, s):
    conv = nn.Conv2d(c, n, k, stride, k // 2, bias=False)
    ghost = GhostConv2d(conv, GhostSpec(s, 3))
    x = torch.randn(2, c, 20, 20)
    out = ghost(x)
    assert out.shape == conv(x).shape
    m = math.ceil(n / s)
    hw = out.shape[2] * out.shape[3]
    assert _macs(ghost, (1, c, 20, 20)) == m * c * k * k * hw + m * (s - 1) * 9 * hw
    assert _params(ghost) == m * c * k * k + m * (s - 1) * 9


@pytest.mark.parametrize("c, n, k, stride, o, ratio", [(32, 64, 3, 1, 2, 0.5), (64, 32, 3, 2, 4, 0.25),
                                                        (16, 48, 1, 1, 2, 0.5)])
def test_a_lego_conv_keeps_the_shape_and_counts_only_what_its_forward_uses(c, n, k, stride, o, ratio):
    conv = nn.Conv2d(c, n, k, stride, k // 2, bias=True)
    lego = LegoConv2d(conv, LegoSpec(o, ratio))
    x = torch.randn(2, c, 16, 16)
    out = lego(x)
    assert out.shape == conv(x).shape
    m = round(ratio * n)
    hw = out.shape[2] * out.shape[3]
    # The lego maps (m filters on each of o fragments) and the 1x1 combination of one map per fragment.
    assert _macs(lego, (1, c, 16, 16)) == m * c * k * k * hw + n * o * hw
    # B, the coefficients and the bias: the selection is an integer buffer, not a parameter.
    assert _params(lego) == m * (c // o) * k * k + n * o + n


def test_the_lego_forward_in_training_equals_the_exported_form():
    conv = nn.Conv2d(16, 32, 3, 1, 1)
    lego = LegoConv2d(conv, LegoSpec(2, 0.5))
    with torch.no_grad():
        for p in lego.parameters():
            p.normal_()
        lego.index.random_(0, lego.legos)
    x = torch.randn(2, 16, 8, 8)
    lego.learn_selection()
    dense = lego.train()(x)
    gathered = lego.eval()(x)
    torch.testing.assert_close(dense, gathered, rtol=1e-5, atol=1e-5)
    # The selection's gradient reaches the scores straight through the one-hot forward.
    lego.train()(x).square().sum().backward()
    assert lego.scores.grad is not None and lego.scores.grad.abs().sum() > 0
    lego.freeze_selection()
    assert lego.scores is None and not any(n == "scores" for n, _ in lego.named_parameters())


def test_resnet50_replaced_counts_match_the_published_recount():
    """Every bottleneck conv and downsample replaced, stem and fc kept (methods notes: Ghost s=2 2.151G and
    s=4 1.182G MACs; Lego o=2 m=0.5 8.03M params, 2.13G MACs)."""
    base = resnet50()
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Conv2d) and n.startswith("stages")]
    assert len(names) == 52  # 16 blocks x 3 convs + 4 downsamples
    counts = {}
    for spec in (GhostSpec(2), GhostSpec(4), LegoSpec(2, 0.5)):
        m = resnet50()
        replace_layers(m, {n: build_replacement(m.get_submodule(n), spec) for n in names})
        counts[spec.key] = (_macs(m, (1, 3, 224, 224)), _params(m))
    assert counts["ghost_s2_d3"][0] / 1e9 == pytest.approx(2.151, abs=0.0005)
    assert counts["ghost_s4_d3"][0] / 1e9 == pytest.approx(1.182, abs=0.0005)
    assert counts["lego_o2_m0.5"][1] / 1e6 == pytest.approx(8.03, abs=0.005)
    assert counts["lego_o2_m0.5"][0] / 1e9 == pytest.approx(2.13, abs=0.01)


def test_a_spec_round_trips_through_its_key():
    for spec in (GhostSpec(2, 3), GhostSpec(4, 5), LegoSpec(2, 0.5), LegoSpec(4, 0.25)):
        assert spec_from_key(spec.key) == spec


# --- fits on a trained layer -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def layer_data(digits_model, digits_data):
    images = torch.stack([digits_data.train[i][0] for i in range(64)])
    check = torch.stack([digits_data.val[i][0] for i in range(32)])
    return capture(digits_model.module, ["conv3.0"], images, check)["conv3.0"]


def test_the_ghost_fit_is_exact_on_the_primary_channels_and_fits_the_others(digits_model, layer_data):
    conv = digits_model.module.get_submodule("conv3.0")
    ghost, error = fit_ghost(conv, GhostSpec(2, 3), layer_data)
    with torch.no_grad():
        y, got = conv(layer_data.x_check), ghost(layer_data.x_check)
    primary = ghost.order < ghost.primary.out_channels  # original channels the primary conv computes
    assert int(primary.sum()) == ghost.primary.out_channels
    torch.testing.assert_close(got[:, primary], y[:, primary], rtol=1e-4, atol=1e-5)
    assert sorted(ghost.order.tolist()) == sorted(set(ghost.order.tolist()))  # each output picked once
    assert error == pytest.approx(relative_error(got, y), rel=1e-4)
    # Better than leaving the cheap channels at zero, which would err by their whole share of the energy.
    zero_cheap = float((y[:, ~primary] ** 2).sum() / (y ** 2).sum())
    assert error < 0.7 * zero_cheap


def test_the_lego_fit_lowers_its_objective_at_every_iteration(digits_model, layer_data):
    conv = digits_model.module.get_submodule("conv3.0")
    lego, fit = fit_lego(conv, LegoSpec(2, 0.5), layer_data, iterations=8)
    assert len(fit.errors) == 9
    assert all(b <= a + 1e-9 for a, b in zip(fit.errors, fit.errors[1:])), fit.errors
    assert fit.errors[-1] < 0.8 * fit.errors[0]
    assert fit.check_error < 0.5  # the held-out output error of the fitted layer


# --- the measured choice ---------------------------------------------------------------------------------


def _row(name, orig_ms, new_ms, macs=100, new_macs=50):
    return LayerChoice(name, orig_ms, new_ms, macs, new_macs, 400, 200)


def test_only_layers_measured_faster_are_replaced_by_default():
    rows = [_row("a", 1.0, 0.5), _row("b", 1.0, 1.2), _row("c", 1.0, 0.98)]
    choose(rows, GhostOptions(), None)
    assert [r.chosen for r in rows] == [True, False, False]
    assert rows[0].reason == "faster: 2.00x standalone" and rows[1].reason.startswith("kept: not measured faster")
    # Measured inside the model, the whole model's ratio decides: a layer faster alone may not be.
    rows = [_row("a", 1.0, 0.5), _row("b", 1.0, 0.5)]
    rows[0].in_model = {"ratio": 0.9, "low": 0.88, "high": 0.92}
    rows[1].in_model = {"ratio": 0.99, "low": 0.97, "high": 1.01}
    choose(rows, GhostOptions(), None)
    assert [r.chosen for r in rows] == [True, False]
    assert "whole model 0.990x [0.970, 1.010]" in rows[1].reason
    forced = [_row("a", 1.0, 0.5), _row("b", 1.0, 1.2)]
    choose(forced, GhostOptions(force=True), None)
    assert all(r.chosen for r in forced)


def test_a_latency_budget_takes_the_largest_gains_until_met_and_refuses_what_faster_layers_cannot_reach():
    rows = [_row("a", 1.0, 0.9), _row("b", 2.0, 1.0), _row("c", 1.0, 1.5)]
    choose(rows, GhostOptions(), ("latency_ms", 10.0, 9.0))
    assert [r.chosen for r in rows] == [False, True, False]  # b alone saves 1 ms
    with pytest.raises(BudgetError) as info:
        choose([_row("a", 1.0, 0.9), _row("c", 1.0, 1.5)], GhostOptions(), ("latency_ms", 10.0, 5.0))
    assert "cannot be reached" in str(info.value) and "9.9" in str(info.value)


def test_a_macs_budget_may_take_slower_layers_after_the_faster_ones():
    rows = [_row("a", 1.0, 0.5, 100, 50), _row("b", 1.0, 1.2, 300, 100), _row("c", 1.0, 1.1, 100, 90)]
    choose(rows, GhostOptions(), ("macs", 500.0, 300.0))
    assert [r.chosen for r in rows] == [True, True, False]
    assert "for the macs budget" in rows[1].reason


def test_the_stem_and_grouped_convs_are_not_candidates_and_batchnorms_are_absorbed(digits_model):
    found = candidates(digits_model.module, digits_model.example_input(), GhostSpec(), None)
    assert found.names == ["conv2.0", "conv3.0", "conv4.0", "conv5.0"]
    assert found.skipped == {"conv1.0": "the stem (reads the model input)"}
    assert found.absorbs == {n: n.replace(".0", ".1") for n in found.names}
    dw = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8))
    found = candidates(dw, torch.randn(1, 3, 8, 8), GhostSpec(), ["*"])
    assert found.names == ["0"] and found.skipped == {"1": "grouped (groups=8)"} and found.absorbs == {}


# --- plan, export, command -------------------------------------------------------------------------------


def test_the_replaced_model_exports_with_parity(digits_model, layer_data):
    module = load_model("zoo:digits-cnn").module
    conv = module.get_submodule("conv3.0")
    ghost, _ = fit_ghost(conv, GhostSpec(2, 3), layer_data)
    conv4 = capture(module, ["conv4.0"], torch.randn(16, 1, 16, 16), torch.randn(8, 1, 16, 16))["conv4.0"]
    lego, _ = fit_lego(module.get_submodule("conv4.0"), LegoSpec(2, 0.5), conv4)
    replace_layers(module, {"conv3.0": ghost, "conv4.0": lego})
    model = LoadedModel("digits-reparam", "factory", digits_model.input_shape, module.eval())
    artifact = export_onnx(model, exporter="torchscript", use_cache=False)
    x = torch.randn(8, *digits_model.input_shape[1:])
    sess = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = module(x).numpy()
    assert np.abs(got - want).max() < 1e-4
    ops = {n.op_type for n in onnx.load(str(artifact.path)).graph.node}
    assert {"Conv", "Gather", "Concat"} <= ops


def test_a_plan_naming_a_layer_the_architecture_lacks_is_refused():
    module = load_model("zoo:digits-cnn").module
    with pytest.raises(ModelLoadError, match="names layer 'nope'"):
        replay_reparam_plan(module, plan_json({"nope": GhostSpec()}, {}), (1, 1, 16, 16))
    with pytest.raises(ModelLoadError, match="grouped"):
        replay_reparam_plan(nn.Sequential(nn.Conv2d(8, 8, 3, groups=8)), plan_json({"0": GhostSpec()}, {}),
                            (1, 8, 8, 8))
    with pytest.raises(ModelLoadError, match="not a BatchNorm2d"):
        replay_reparam_plan(module, plan_json({"conv2.0": GhostSpec()}, {"conv2.0": "conv2.2"}), (1, 1, 16, 16))


@pytest.fixture(scope="module")
def reparam_run(tmp_path_factory):
    from typer.testing import CliRunner

    from squeeze.cli.app import app

    out = tmp_path_factory.mktemp("reparam") / "out"
    r = CliRunner().invoke(app, ["reparam", "zoo:digits-cnn", "--method", "lego", "--data", "digits",
                                 "--replace-all", "--option", "fine_tune={iterations: 20, lr: 0.001}", "--option", "fit_images=32",
                                 "--repeat", "5", "--warmup", "2", "--min-repeat-ms", "2", "--out", str(out)])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    return out, json.loads((out / "report.json").read_text()), r.stdout


def test_squeeze_reparam_writes_a_replayable_checkpoint_and_reports_every_layer(reparam_run):
    out, report, stdout = reparam_run
    rec = report["stages"][0]["record"]
    assert [row["name"] for row in rec["layers"]] == ["conv2.0", "conv3.0", "conv4.0", "conv5.0"]
    assert all(row["chosen"] and row["reason"].startswith("forced") for row in rec["layers"])
    assert all(row["in_model"]["n"] >= 5 and row["in_model"]["low"] <= row["in_model"]["high"] for row in rec["layers"])
    assert rec["plan"]["layers"]["conv2.0"]["absorbs"] == "conv2.1"
    assert all(row["original_ms"] > 0 and row["replacement_ms"] > 0 and row["fit"]["relative_error"] < 1
               for row in rec["layers"])
    assert rec["plan"]["kind"] == "reparam" and set(rec["plan"]["layers"]) == {r["name"] for r in rec["layers"]}
    assert report["final"]["macs"] < report["original"]["macs"]
    assert "fine_tuned" in rec["val_top1"] and report["accuracy"]["final_top1"] > 0.4  # 10 classes: chance is 0.1
    assert "lego per layer" in stdout
    html = (out / "report.html").read_text()
    assert "reparam.lego: replaced or kept, per layer" in html and all(n in html for n in ("conv2.0", "conv5.0"))
    assert {"figure-layers.png", "figure-layer-latency.png"} <= {p.name for p in out.iterdir()}
    # Reloaded without pickle (weights_only), the checkpoint computes what the shipped ONNX file computes.
    reloaded = load_model(str(out / "model.pt"))
    assert sum(isinstance(m, LegoConv2d) for m in reloaded.module.modules()) == 4
    assert isinstance(reloaded.module.get_submodule("conv2.1"), nn.Identity)
    x = torch.randn(4, 1, 16, 16)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = reloaded.module(x).numpy()
    assert np.abs(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0] - want).max() < 1e-4


def test_reparam_without_data_is_refused_before_any_work(cli, model_file, tmp_path):
    before = file_digest(model_file)
    r = cli("reparam", model_file, "--out", tmp_path / "out")
    assert r.exit_code != 0
    assert "needs data (--data)" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and file_digest(model_file) == before


def test_reparam_with_a_bad_option_names_it(cli, model_file, tmp_path):
    r = cli("reparam", model_file, "--data", "digits", "--option", "dw_size=2", "--out", tmp_path / "out")
    assert r.exit_code != 0 and "dw_size must be odd" in r.stderr
    r = cli("reparam", model_file, "--method", "adder", "--data", "digits", "--out", tmp_path / "out")
    assert r.exit_code != 0 and "ghost, lego" in r.stderr
    assert not (tmp_path / "out").exists()


def test_no_layer_faster_in_the_model_refuses_and_writes_nothing(cli, model_file, tmp_path, monkeypatch):
    import squeeze.reparam.run as run

    slower = {"ratio": 1.08, "low": 1.05, "high": 1.1, "confidence": 0.95, "n": 5, "method": "fixed"}
    monkeypatch.setattr(run, "measure_in_model", lambda original, found, *a, **k: {n: slower for n in found.names})
    before = file_digest(model_file)
    r = cli("reparam", model_file, "--data", "digits", "--out", tmp_path / "out", "--repeat", "5", "--warmup", "2",
            "--min-repeat-ms", "2")
    assert r.exit_code == 1, (r.stdout, r.stderr)
    assert "No layer runs faster on `host-cpu` as a ghost replacement" in r.stderr
    assert "whole model 1.080x [1.050, 1.100]" in r.stderr and "--replace-all" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() and file_digest(model_file) == before
