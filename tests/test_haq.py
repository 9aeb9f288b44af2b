"""HAQ mixed precision: action -> precision, the budget wall, the measured/modelled cost table, fake
quantization against ONNX Runtime's own, the policy export, budget errors, and a short search end to end."""

import json
import logging
import math
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from rich.console import Console
from torch import nn

from squeeze.data import load_data
from squeeze.errors import DataError
from squeeze.export.onnx import export_onnx
from squeeze.export.ort import run_batched
from squeeze.measure.lut import LatencyTable, LayerConfig, layer_configs
from squeeze.measure.protocol import Protocol
from squeeze.model.loading import LoadedModel, load_model
from squeeze.methods.quant.haq import HAQOptions, _pareto, haq_search
from squeeze.prune.budget import BudgetError
from squeeze.quant.calibrate import CalibrationData
from squeeze.quant.costs import PRECISIONS, CostTable, modelled_precision, precision
from squeeze.quant.haq import (_fake_weight, action_to_index, budget_wall, export_policy, fake_quant_model,
                               input_ranges, strip_fake_quant)
from squeeze.quant.ptq import op_counts
from squeeze.recipe import Budget, Recipe, Stage
from squeeze.report.quant import haq_view
from squeeze.target import load_target

HOST = load_target("host-cpu")
FAST = Protocol.for_target(HOST, repeat=5, warmup=2, min_repeat_ms=2, threads=1)
# The cost table's protocol: shorter than the default, stored under its own scope in the test cache.
TABLE = Protocol.for_target(HOST, repeat=4, warmup=1, min_repeat_ms=2, threads=1)
QUICK = {"short_term": {"optimizer": "sgd", "lr": 0.001, "iterations": 3},
         "long_term": {"optimizer": "sgd", "lr": 0.001, "iterations": 3}, "samples": 64}


# --- action -> precision ---------------------------------------------------------------------------


def test_action_to_index_edges_and_bins():
    assert action_to_index(0.0, 7) == 0
    assert action_to_index(1.0, 7) == 6  # HAQ's round-half-even would give 8.5 -> 8 only by luck of parity
    assert action_to_index(0.5, 7) == 3  # bits 2..8: 5, as HAQ's round(0.5 * 7 + 2 - 0.5) = 5
    assert action_to_index(1 / 7 - 1e-9, 7) == 0 and action_to_index(1 / 7 + 1e-9, 7) == 1
    assert action_to_index(0.99, 1) == 0
    assert action_to_index(-0.1, 3) == 0 and action_to_index(1.1, 3) == 2
    # Away from the bin edges it is exactly HAQ's formula over bits 2..8.
    for a in np.random.default_rng(0).uniform(0, 1, 500):
        haq_bits = int(np.round((8 + 0.5 - (2 - 0.5)) * a + 2 - 0.5))
        assert 2 + action_to_index(a, 7) == haq_bits


# --- the budget wall -------------------------------------------------------------------------------

# Four layers, three choices each (think 4 / 8 / 32 bits); cost grows with the choice.
COSTS = [[1.0, 2.0, 4.0], [1.0, 3.0, 6.0], [2.0, 4.0, 8.0], [1.0, 2.0, 5.0]]


def _cost(policy):
    return sum(c[j] for c, j in zip(COSTS, policy))


def test_wall_lowers_from_the_last_layer_back_until_it_fits():
    top = [2, 2, 2, 2]  # cost 23
    assert budget_wall(top, COSTS, [0] * 4, 23.0) == top  # already fits: untouched
    # One step of the last layer (5 -> 2) fits 20.
    assert budget_wall(top, COSTS, [0] * 4, 20.0) == [2, 2, 2, 1]
    # Then the one before it (8 -> 4): 16.
    assert budget_wall(top, COSTS, [0] * 4, 16.0) == [2, 2, 1, 1]
    # A second sweep starts again at the last layer.
    got = budget_wall(top, COSTS, [0] * 4, 10.0)
    assert _cost(got) <= 10.0
    assert got == [1, 1, 1, 0]  # sweep 1 -> [1, 1, 1, 1] (11), sweep 2 lowers the last layer first: 10


def test_wall_respects_floors_and_stops_at_the_cheapest_policy():
    floors = [1, 0, 0, 2]  # first and last layer pinned (8 and 32 bits)
    got = budget_wall([2, 2, 2, 2], COSTS, floors, 0.0)  # impossible: ends at the floors
    assert got == floors
    got = budget_wall([2, 2, 2, 2], COSTS, floors, 13.0)
    assert _cost(got) <= 13.0 and all(j >= f for j, f in zip(got, floors))
    assert got[3] == 2


def test_pareto_drops_choices_not_faster_than_a_wider_one():
    fp32, int8, int4w = PRECISIONS["fp32"], PRECISIONS["int8"], PRECISIONS["int4w"]
    # int8 slower than fp32 (quantize/dequantize overhead on a tiny layer): dropped; int4w still faster.
    choices, costs, measured = _pareto([int4w, int8, fp32], [0.5, 2.0, 1.0], [True] * 3)
    assert [c.name for c in choices] == ["int4w", "fp32"] and costs == [0.5, 1.0]
    choices, _, _ = _pareto([int8, fp32], [1.0, 1.0], [True, True])  # equal: the wider one stays
    assert [c.name for c in choices] == ["fp32"]


def test_a_missed_latency_budget_refits_the_table_and_lowers_the_policy():
    from squeeze.prune.budget import ResolvedBudget
    from squeeze.quant.costs import CostRow
    from squeeze.methods.quant.haq import HAQSetup, _refit_and_lower, _table_sums
    from squeeze.quant.haq import HAQLayer

    int8, fp32 = PRECISIONS["int8"], PRECISIONS["fp32"]
    cfg = LayerConfig("conv2d", 8, 8, 8, 8, (3, 3), (1, 1), (1, 1), 1)
    layers = [HAQLayer(f"l{i}", cfg, [int8, fp32], [0.5, 1.0], [True, True]) for i in range(4)]
    rows = [CostRow(f"l{i}", cfg.key, "fp32", 32, 32, 1.0, 0.0, True) for i in range(4)]
    setup = HAQSetup(None, None, HOST, FAST, None, layers=layers, rows=rows,
                     resolved=ResolvedBudget("latency_ms", 1.0, 0.75))
    assert _table_sums(rows, "fp32") == 4.0
    # The table (C = 0) says two int8 layers reach 0.75x; the measurement says 0.8x: C is re-fitted so that
    # (3 + C) / (4 + C) = 0.8, i.e. C = 1, and the budget becomes 0.75 (4 + 1) - 1 = 2.75 table units.
    lower = _refit_and_lower(setup, ("fp32", "fp32", "int8", "int8"), 0.8)
    assert setup.constant_ms == pytest.approx(1.0) and setup.target_cost == pytest.approx(2.75)
    assert lower == ("fp32", "int8", "int8", "int8")  # walking back, the first layer that could go lower


# --- the cost table --------------------------------------------------------------------------------


def _tiny_layers():
    return {"conv": LayerConfig("conv2d", 4, 8, 8, 8, (3, 3), (1, 1), (1, 1), 1), "fc": LayerConfig("linear", 32, 16)}


@pytest.fixture(scope="module")
def cost_rows():
    table = CostTable(HOST, TABLE)
    return table, table.rows(_tiny_layers(), modelled=True)


def test_cost_table_flags_measured_and_modelled_rows(cost_rows):
    table, rows = cost_rows
    conv = {r.precision: r for r in rows if r.layer == "conv"}
    fc = {r.precision: r for r in rows if r.layer == "fc"}
    assert set(conv) == {"fp32", "int8", "w2a8", "w3a8", "w4a8", "w5a8", "w6a8", "w7a8"}
    assert set(fc) == {"fp32", "int8", "int4w"}  # 4-bit weight-only only for Linear; no modelled Linear rows
    assert all(r.measured and r.latency_ms > 0 and not r.note for r in [*fc.values(), conv["fp32"], conv["int8"]])
    for bits in range(2, 8):
        r = conv[f"w{bits}a8"]
        assert not r.measured and f"no {bits}-bit kernel" in r.note
        assert r.latency_ms == pytest.approx(conv["int8"].latency_ms * bits / 8)
        assert r.size_bytes == 8 * 4 * 9 * bits / 8 + 4 * 8
    assert fc["int4w"].size_bytes == 16 * 32 * 4 / 8 + 4 * 16 and fc["fp32"].size_bytes == 16 * 32 * 4 + 4 * 16
    # On a CPU, ORT runs fp16 convolutions as fp32 between Casts: no fp16 row, and the table says why.
    assert "fp16" not in table.precisions and "casts to fp32" in table.unsupported["fp16"]


def test_cost_table_shares_the_pruning_tables_entries(cost_rows):
    _, rows = cost_rows
    conv_fp32 = next(r for r in rows if r.layer == "conv" and r.precision == "fp32")
    assert conv_fp32.key == _tiny_layers()["conv"].key  # the pruning table's key
    stored = LatencyTable(HOST, TABLE).stored([conv_fp32.key, conv_fp32.key + "_int8"])
    assert stored[conv_fp32.key].median_ms == conv_fp32.latency_ms
    assert conv_fp32.key + "_int8" in stored  # same SQLite table, same scope


def test_precision_names_round_trip():
    for name in ["fp32", "fp16", "int8", "int4w", "w3a8"]:
        assert precision(name).name == name
    assert modelled_precision(5) == precision("w5a8") and not precision("w5a8").kernel
    with pytest.raises(ValueError):
        modelled_precision(8)


# --- fake quantization and the exported policy -----------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 70)).eval()
    x = torch.randn(32, 3, 8, 8)
    return LoadedModel("tiny", "factory", (1, 3, 8, 8), net), x, CalibrationData(x.numpy(), "test", 16)


def test_4_bit_weights_leave_the_logging_as_it_was(tmp_path):
    """ORT's MatMulNBits module calls logging.basicConfig on import: a root handler at INFO would print every later
    log line twice and let other libraries' INFO lines through (seen in `squeeze quantize --method haq`)."""
    code = ("import logging\n"
            "from squeeze.export.onnx import export_onnx\n"
            "from squeeze.measure.lut import LayerConfig\n"
            "from squeeze.model.loading import LoadedModel\n"
            "from squeeze.quant.mixed import int4_weights\n"
            "module, shape = LayerConfig('linear', 64, 64).build()\n"
            "int4_weights(export_onnx(LoadedModel('fc', 'factory', shape, module), exporter='torchscript'), ['0'])\n"
            "print(len(logging.getLogger().handlers), logging.getLogger().level)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "SQUEEZE_CACHE_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", str(logging.WARNING)]


def test_fake_int8_weights_equal_onnxruntime_quantization(tiny):
    from squeeze.quant import QuantConfig, quantize_onnx
    from squeeze.quant.fakequant import int8_reduce_range

    model, _, calibration = tiny
    # HAQ's int8 layers are 7-bit on CPUs without an int8 dot product, in fake-quant and export alike.
    config = QuantConfig(per_layer={"4": "fp32"}, reduce_range=int8_reduce_range())
    q = quantize_onnx(export_onnx(model), calibration, config)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(q.path)).graph.initializer}
    ort_weight = inits["0.weight_quantized"].astype(np.float32) * inits["0.weight_scale"].reshape(-1, 1, 1, 1)
    assert np.array_equal(ort_weight, _fake_weight(model.module[0].weight, PRECISIONS["int8"]).detach().numpy())


def test_fake_quant_model_tracks_the_exported_policy(tiny):
    """Torch fake-quant outputs are much closer to the ORT export than the float model's are."""
    model, x, calibration = tiny
    policy = {"0": PRECISIONS["int8"], "4": PRECISIONS["int4w"]}
    fq = fake_quant_model(model.module, policy, input_ranges(model.module, ["0", "4"], x))
    exported = export_policy(model, policy, calibration, "minmax")
    assert op_counts(exported.path).get("MatMulNBits") == 1 and op_counts(exported.path)["DequantizeLinear"] >= 2
    ort = run_batched(exported, x.numpy())
    with torch.no_grad():
        fq_err = np.abs(fq(x).numpy() - ort).max()
        float_err = np.abs(model.module(x).numpy() - ort).max()
    assert fq_err < 0.25 * float_err


def test_simulated_bits_are_exported_on_their_grid(tiny):
    model, x, calibration = tiny
    policy = {"0": precision("w3a8"), "4": PRECISIONS["fp32"]}
    fq = fake_quant_model(model.module, policy, input_ranges(model.module, ["0"], x))
    rounded = strip_fake_quant(fq, {"0"})
    assert not any(type(m).__name__ == "_QuantLayer" for m in rounded.modules())
    exported = export_policy(LoadedModel("tiny3", "factory", (1, 3, 8, 8), rounded), policy, calibration, "minmax")
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(exported.path)).graph.initializer}
    weight = inits["0.weight_quantized"].reshape(8, -1)  # int8 storage
    # 3 bits: at most 2^3 - 1 = 7 levels per output channel, though stored as int8.
    assert all(len(np.unique(row)) <= 7 for row in weight)
    assert "4.weight" in inits  # the fp32 layer stays float
    assert torch.equal(model.module[0].weight, tiny[0].module[0].weight)  # the input model is untouched


# --- errors and the search end to end ----------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    model = load_model("zoo:digits-cnn")
    return model, load_data("digits", input_shape=model.input_shape)


def test_haq_needs_data_and_a_budget(digits):
    model, data = digits
    with pytest.raises(DataError, match="HAQ needs data"):
        haq_search(model, None, HOST, FAST, Budget(latency_ratio=0.6), HAQOptions(**QUICK))
    with pytest.raises(BudgetError, match="latency or model-size budget"):
        haq_search(model, data, HOST, FAST, Budget(macs_ratio=0.5), HAQOptions(**QUICK))


def test_impossible_latency_budget_says_what_is_reachable(digits):
    model, data = digits
    with pytest.raises(BudgetError) as exc:
        haq_search(model, data, HOST, FAST, Budget(latency_ratio=0.05), HAQOptions(**QUICK))
    msg = str(exc.value)
    assert "No precision policy meets the latency budget" in msg and "uniform int8 measured" in msg
    reachable = float(msg.split("Ask for ")[1].split("x")[0])
    assert 0.05 < reachable <= 2.0


def test_impossible_size_budget(digits):
    model, data = digits
    with pytest.raises(BudgetError, match="size budget of 1000 bytes") as exc:
        haq_search(model, data, HOST, FAST, Budget(size_bytes=1000), HAQOptions(**QUICK))
    assert "lower min_bits" in str(exc.value)


def test_cli_impossible_budget_exits_2_and_writes_nothing(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("quantize", "zoo:digits-cnn", "--method", "haq", "--latency", "0.05x", "--data", "digits",
            "--samples", "64", "--out", out)
    assert r.exit_code == 2, r.output
    assert "No precision policy meets the latency budget" in r.stderr and "Traceback" not in r.output
    assert not out.exists()


def test_cli_size_budget_is_met_on_the_weights_counted_at_their_bits(cli, tmp_path):
    # the ONNX file stores 2-7-bit weights as int8, so it is larger than what HAQ's size budget limits
    out = tmp_path / "out"
    r = cli("quantize", "zoo:digits-cnn", "--method", "haq", "--size-bytes", 60000, "--min-bits", 2,
            "--max-accuracy-drop", 3, "--min-agreement", 0.97, "--data", "digits", "--samples", 64, "--episodes", 2,
            "--warmup-episodes", 1, "--option", "short_term.iterations=3", "--option", "long_term.iterations=3",
            "--repeat", 5, "--warmup", 2, "--min-repeat-ms", 2, "--out", out)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    counted = report["stages"][0]["record"]["counted_size_bytes"]["final"]
    assert report["budget"] == {"limits": {"size_bytes": 60000}, "final": {"size_bytes": counted}, "met": True,
                                "missed": [], "size_from": "weights counted at their bits"}
    assert counted <= 60000 < (out / "model.onnx").stat().st_size


def test_options_are_checked():
    with pytest.raises(ValueError, match="min_bits 9 is above max_bits 8"):
        HAQOptions(min_bits=9, max_bits=8)
    with pytest.raises(ValueError, match="quant.haq need a `budget:`"):
        Recipe(name="r", stages=[Stage(method="quant.haq", options={"episodes": 5})])
    stage = Stage(method="quant.haq", options={"episodes": 5, "short_term": {"iterations": 7}})
    assert Recipe(name="r", budget=Budget(size_bytes=10**5), stages=[stage]).stages[0].typed_options().episodes == 5


def test_haq_end_to_end_on_digits(digits):
    model, data = digits
    fingerprint = model.fingerprint
    try:
        tuned, artifact, result = haq_search(model, data, HOST, FAST, Budget(latency_ratio=0.8),
                                             HAQOptions(episodes=3, warmup=1, **QUICK))
    except BudgetError as exc:
        # Where int8 is not 20% faster on this CPU (or a busy one reads it so), refusing is the right verdict.
        assert "No precision policy meets the latency budget" in str(exc)
        pytest.skip(f"no policy reads 0.8x of fp32 on this machine now: {exc}")
    r = result.to_json()
    assert len(r["episodes"]) == 3 and r["episodes"][0]["noise_sigma"] is None
    assert all(e["critic_loss"] is not None for e in r["episodes"][1:])
    names = [row["layer"] for row in r["rows"]]
    assert names == list(n for n, c in layer_configs(model.module, model.example_input()).items() if c.op != "bn2d")
    assert all(row["measured"] for row in r["rows"])  # a latency budget only uses measured precisions
    # The graph holds what the policy says: one QDQ pair per int8 layer's weight, MatMulNBits per int4w.
    counts = op_counts(artifact.path)
    int8 = sum(p == "int8" for p in r["layers"].values())
    assert counts.get("MatMulNBits", 0) == sum(p == "int4w" for p in r["layers"].values())
    assert (counts.get("DequantizeLinear", 0) > 0) == (int8 > 0)
    lat = r["latency"]
    assert r["search_budget"]["met"] == (lat["haq_ms"] / lat["fp32_ms"] <= 1.02 * 0.8)
    assert 0.9 <= r["accuracy"]["haq_top1"] <= 1.0 and math.isfinite(lat["predicted_haq_ms"])
    assert r["output_parity"]["below_floor"] == [] and r["output_parity"]["top1_agreement"] >= 0.99
    assert model.fingerprint == fingerprint  # the input model is untouched
    assert tuned.module is not model.module
    console = Console(width=200, record=True)
    console.print(haq_view(r))
    text = console.export_text()
    assert "HAQ policy" in text and all(n in text for n in names) and "measured interleaved" in text
    assert "fp16: not a choice here" in text


def test_haq_size_budget_takes_low_bits_and_simulates_them(digits):
    model, data = digits
    budget = 60_000  # fp32 545 KB, int8 everywhere about 140 KB: needs about 3 bits in the middle layers
    # 2-3-bit weights cost about a point on digits: a floor the user relaxes for this budget.
    _, artifact, result = haq_search(model, data, HOST, FAST, Budget(size_bytes=budget),
                                     HAQOptions(episodes=2, warmup=1, min_agreement=0.97, max_accuracy_drop=3, **QUICK))
    r = result.to_json()
    assert r["search_budget"]["met"] and r["counted_size_bytes"]["final"] <= budget
    rows = {row["layer"]: row for row in r["rows"]}
    assert rows["conv1.0"]["weight_bits"] >= 8 and rows["fc"]["weight_bits"] >= 8  # first and last layers
    assert r["simulated_layers"] and all(not rows[n]["measured"] and "simulated" in rows[n]["exported_as"]
                                         for n in r["simulated_layers"])
    # Each simulated layer's int8 weights hold at most 2^b - 1 levels per output channel.
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(artifact.path)).graph.initializer}
    for name in r["simulated_layers"]:
        w = inits[f"{name}.weight_quantized"]
        levels = 2 ** rows[name]["weight_bits"] - 1
        assert all(len(np.unique(ch)) <= levels for ch in w.reshape(w.shape[0], -1))


def test_haq_export_below_the_floor_is_refused(digits):
    from squeeze.quant.parity import ParityError

    model, data = digits
    with pytest.raises(ParityError, match=r"The HAQ model falls below the accuracy floor against fp32 on 360 test "
                                          r"images: .*SNR [0-9.]+ dB < 200 dB. Nothing was written. Relax the budget"):
        haq_search(model, data, HOST, FAST, Budget(size_bytes=60_000),
                   HAQOptions(episodes=2, warmup=1, min_snr_db=200, **QUICK))


def test_cli_episode_flags_reach_the_search_and_only_haq(cli, tmp_path, monkeypatch):
    from squeeze.errors import SqueezeError
    from squeeze.methods.quant.haq import HAQPass

    seen = {}

    def capture(self, state, ctx):
        seen.update(episodes=self.options.episodes, warmup=self.options.warmup)
        raise SqueezeError("stopped by the test.", "-")

    monkeypatch.setattr(HAQPass, "run", capture)
    r = cli("quantize", "zoo:digits-cnn", "--method", "haq", "--latency", "0.6x", "--data", "digits",
            "--episodes", 7, "--warmup-episodes", 2, "--out", tmp_path / "out")
    assert r.exit_code == 2 and "stopped by the test" in r.stderr and seen == {"episodes": 7, "warmup": 2}
    r = cli("quantize", "zoo:digits-cnn", "--data", "digits", "--episodes", 7, "--out", tmp_path / "out2")
    assert r.exit_code == 2 and "--episodes does not apply to --method int8" in r.stderr
