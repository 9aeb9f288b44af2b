"""prune.mdp: the multi-branch layer, the gates, the multidim plan (export parity, checkpoint replay), the
expected-latency term against a table, and an end-to-end run under a MACs budget."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from squeeze import api
from squeeze.export.onnx import export_onnx
from squeeze.export.ort import run_batched
from squeeze.measure.lut import LutEntry, layer_configs
from squeeze.methods.prune.mdp import BranchPrices, Gates, branch_prices, expected_cost
from squeeze.model.loading import LoadedModel, load_model, save_checkpoint
from squeeze.prune.multidim import (
    MultiBranchConv,
    MultiDimPlan,
    apply_multidim,
    branch_configs,
    candidate_factors,
    conv_input_shapes,
    multidim_from_json,
    supernet,
)
from squeeze.prune.plan import ChannelPlan, PlanError
from squeeze.recipe import Budget
from testnets import conv_stack

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def digits():
    return load_model("zoo:digits-cnn")


def _one_hot(layer: MultiBranchConv, i: int) -> None:
    with torch.no_grad():
        layer.alpha.fill_(-float("inf"))
        layer.alpha[i] = 0.0


def test_multi_branch_layer_with_only_scale_one_is_the_plain_conv_exactly():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    with torch.no_grad():
        alone = MultiBranchConv(conv, [(1, 1)], (16, 16))(X)
        mixed = MultiBranchConv(conv, [(1, 1), (2, 2), (4, 4)], (16, 16))
        _one_hot(mixed, 0)  # the other branches have probability exactly 0
        assert torch.equal(alone, conv(X)) and torch.equal(mixed(X), conv(X))


def test_branches_share_the_conv_and_restore_the_output_size():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    layer = MultiBranchConv(conv, [(1, 1), (2, 2)], (8, 8))
    assert [p for p in layer.parameters() if p is not layer.alpha] == list(conv.parameters())
    _one_hot(layer, 1)
    with torch.no_grad():
        y = layer(X)
        assert y.shape == (4, 8, 8, 8)
        small = conv(nn.functional.avg_pool2d(X, 2))  # (4, 8, 4, 4), each value repeated 2x2
        assert torch.equal(y, small.repeat_interleave(2, 2).repeat_interleave(2, 3))


def test_gates_at_one_change_nothing_and_fold_exactly(digits):
    x = digits.example_input(4)
    net, layers = supernet(digits.module, x[:1], {n: [(1, 1)] for n in conv_input_shapes(digits.module, x[:1])})
    gates = Gates(net, list(layers), x[:1])
    with torch.no_grad():
        ref = digits.module.eval()(x)
        assert torch.equal(net.eval()(x), ref)
        for g in gates.params.values():
            g.uniform_(0.5, 1.5)
        gated = net(x)
        assert not torch.allclose(gated, ref)
        gates.fold()  # the hooks go, their gates move into the BatchNorms
        torch.testing.assert_close(net(x), gated, rtol=1e-5, atol=1e-5)


def test_gates_sit_after_the_batchnorm_that_reads_the_conv(digits):
    x = digits.example_input()
    net, layers = supernet(digits.module, x, {"conv2.0": [(1, 1), (2, 2)]})
    gates = Gates(net, list(layers), x)
    assert gates.targets["conv2.0"] is net.conv2[1]


def test_candidate_factors_fit_the_input():
    assert candidate_factors(nn.Conv2d(3, 3, 3), (1, 3, 6, 6), (1, 2, 4, 8)) == [(1, 1), (2, 2), (4, 4)]
    assert candidate_factors(nn.Conv3d(3, 3, 3), (1, 3, 4, 8, 8), (1, 2), (1, 2)) == [
        (1, 1, 1), (1, 2, 2), (2, 1, 1), (2, 2, 2)]
    # At least min_side pixels a side, and two frames.
    assert candidate_factors(nn.Conv2d(3, 3, 3), (1, 3, 7, 7), (1, 2, 4), min_side=3) == [(1, 1), (2, 2)]
    assert candidate_factors(nn.Conv3d(3, 3, 3), (1, 3, 2, 8, 8), (1, 2), (1, 2), min_side=4) == [(1, 1, 1), (1, 2, 2)]


def _plan(model, scales, keep=None) -> MultiDimPlan:
    channels = None
    if keep:
        channels = ChannelPlan({n: len(i) for n, i in keep.items()}, keep, round_to=1)
    return MultiDimPlan(scales, channels, "nearest")


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_exported_mdp_net_matches_torch(mode):
    """conv_stack has no BatchNorm; digits-cnn (below) moves its BatchNorms before the resize."""
    net = conv_stack(3, 16)
    x = X[:1]
    plan = MultiDimPlan({"2": (2, 2), "4": (4, 4)}, ChannelPlan({"2": 8}, {"2": list(range(0, 16, 2))}, round_to=1),
                        mode)
    pruned = apply_multidim(net, plan, x)
    ops = {c.op for c in layer_configs(pruned, x).values()}
    assert {"avgpool2d", "resize2d"} <= ops
    art = export_onnx(LoadedModel("mdp", "factory", (1, 3, 16, 16), pruned), use_cache=False)
    assert art.parity.passed
    got = run_batched(art.path, X.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(got, pruned.eval()(X).numpy(), rtol=1e-3, atol=1e-4)


def test_a_batchnorm_before_the_resize_computes_what_it_computed_after(digits):
    """Moved inside the ScaledConv (before the resize, next to the conv), a BatchNorm gives the same outputs: a
    per-channel affine commutes with nearest and bilinear resizing."""
    from squeeze.prune.multidim import ScaledConv, apply_scales

    x = digits.example_input(4)
    for mode in ("nearest", "bilinear"):
        moved = apply_scales(copy.deepcopy(digits.module), {"conv2.0": (2, 2), "conv5.0": (4, 4)}, x[:1], mode)
        assert isinstance(moved.conv2[1], nn.Identity) and isinstance(moved.conv2[0].norm, nn.BatchNorm2d)
        after = copy.deepcopy(digits.module)
        for name in ("conv2", "conv5"):  # the same scales with the BatchNorm left after the resize
            seq = after.get_submodule(name)
            factors = (2, 2) if name == "conv2" else (4, 4)
            seq[0] = ScaledConv(seq[0], factors, moved.get_submodule(name)[0].upsample.size, mode)
        with torch.no_grad():
            torch.testing.assert_close(moved.eval()(x), after.eval()(x), rtol=1e-5, atol=1e-5)


def test_plan_replays_on_reload(digits, tmp_path):
    x = digits.example_input(4)
    plan = _plan(digits, {"conv2.0": (2, 2), "conv5.0": (4, 4)}, {"conv3.0": list(range(0, 64, 2))})
    module = apply_multidim(digits.module, plan, x[:1])
    model = LoadedModel("d", "zoo", digits.input_shape, module, arch=digits.arch, plans=[plan.to_json()])
    save_checkpoint(tmp_path / "m.pt", model)
    again = load_model(str(tmp_path / "m.pt"))
    assert again.plans[0]["kind"] == "multidim" and again.plans[0]["scales"]["conv2.0"] == [0.5, 0.5]
    with torch.no_grad():
        assert torch.equal(again.module.eval()(x), module.eval()(x))


def test_plan_json_round_trips_and_bad_plans_are_named():
    plan = _plan(None, {"a": (2, 2)}, {"b": [0, 2]})
    again = multidim_from_json(json.loads(json.dumps(plan.to_json())))
    assert again.factors == {"a": (2, 2)} and again.channels.kept_indices == {"b": [0, 2]}
    with pytest.raises(PlanError, match="1/k"):
        multidim_from_json({**plan.to_json(), "scales": {"a": [0.3, 0.3]}})
    with pytest.raises(PlanError, match="upsample"):
        multidim_from_json({**plan.to_json(), "upsample": "cubic"})
    with pytest.raises(PlanError, match="not a Conv2d"):
        apply_multidim(conv_stack(), MultiDimPlan({"1": (2, 2)}), X[:1])


class FakeTable:
    """A lookup table whose entry for a key is a fixed function of the key (no measurement)."""

    def entries(self, configs):
        return {c.key: LutEntry(c.key, 1, ms := 0.001 * (len(c.key) + sum(map(ord, c.key)) % 97), 0.0, ms)
                for c in configs}


def test_expected_latency_is_the_table_price_of_the_argmax_when_one_hot(digits):
    x = digits.example_input()
    shapes = conv_input_shapes(digits.module, x)
    candidates = {n: candidate_factors(digits.module.get_submodule(n), shapes[n]) for n in shapes}
    table = FakeTable()
    prices = branch_prices(digits.module, shapes, candidates, "latency_ms", table)
    net, layers = supernet(digits.module, x, candidates)
    chosen = {"conv1.0": 0, "conv2.0": 1, "conv3.0": 2, "conv4.0": 1, "conv5.0": 0}
    for name, i in chosen.items():
        _one_hot(layers[name], i)
    factors = {n: candidates[n][i] for n, i in chosen.items()}
    # the same layers of the pruned model, priced entry by entry
    pruned = apply_multidim(digits.module, MultiDimPlan(factors), x)
    configs = [c for n, c in layer_configs(pruned, x).items() if n.split(".")[0] + ".0" in chosen
               and not n.endswith(".1")]
    table_sum = sum(e.median_ms for e in table.entries(configs).values())
    got = expected_cost(layers, prices).item() * prices.full
    assert got == pytest.approx(table_sum, rel=1e-6)
    assert got == pytest.approx(sum(sum(e.median_ms for e in table.entries(
        branch_configs(digits.module.get_submodule(n), shapes[n], f)).values()) for n, f in factors.items()))


def test_macs_prices_fall_with_the_scale(digits):
    x = digits.example_input()
    shapes = conv_input_shapes(digits.module, x)
    prices = branch_prices(digits.module, shapes, {"conv3.0": [(1, 1), (2, 2), (4, 4)]}, "macs")
    full, half, quarter = prices.prices["conv3.0"]
    assert full == 32 * 64 * 9 * 8 * 8 and half == full / 4 and quarter == full / 16
    assert isinstance(prices, BranchPrices) and prices.full == full


@pytest.mark.slow
def test_lut_check_covers_an_mdp_pruned_model(digits):
    """`squeeze lut check` on an MDP result: its random channel plans keep the scales, and the table prices the
    pools and resizes as entries of their own."""
    from squeeze.measure.lut import LatencyTable, TableOracle
    from squeeze.measure.protocol import Protocol
    from squeeze.prune.tables import check_table, search_space_configs
    from squeeze.target import load_target

    x = digits.example_input()
    plan = _plan(digits, {"conv2.0": (2, 2), "conv4.0": (4, 4)}, {"conv3.0": list(range(48))})
    model = LoadedModel("d", "zoo", digits.input_shape, apply_multidim(digits.module, plan, x), arch=digits.arch,
                        plans=[plan.to_json()])
    ops = [c.op for c in search_space_configs(model)]
    assert ops.count("avgpool2d") >= 2 and ops.count("resize2d") >= 2
    host = load_target("host-cpu")
    table = LatencyTable(host, Protocol.for_target(host, repeat=5, warmup=2, min_repeat_ms=2))
    per_layer = TableOracle(table, model).predict(model).per_layer_ms
    assert {"conv2.0.pool", "conv2.0.conv", "conv2.0.upsample"} <= set(per_layer)
    result = check_table(model, table, n_plans=2, fit_on=1)
    assert len(result.rows) == 2 and all(r.predicted_ms > 0 and r.measured_ms > 0 for r in result.rows)


def test_mdp_on_digits_meets_a_macs_budget(tmp_path):
    options = {"search": {"iterations": 20, "batch_size": 32}, "long_term": {"iterations": 20}}
    report = api.compress("zoo:digits-cnn", tmp_path / "out", "prune.mdp", budget=Budget(macs_ratio=0.5),
                          data="digits", options=options, measure={"repeat": 3, "warmup": 0, "min_repeat_ms": 0})
    record = report["stages"][0]["record"]
    assert record["search"] == "mdp" and record["budget_met"]
    assert record["final_measured"] <= 0.5 * record["budget"]["original"]
    assert record["plan"]["kind"] == "multidim"
    assert set(record["scales"]) == {"conv1.0", "conv2.0", "conv3.0", "conv4.0", "conv5.0"}
    assert all(abs(sum(p) - 1) < 1e-3 for p in record["branch_probs"].values())
    assert report["accuracy"]["final_top1"] > 0.8
    replayed = load_model(str(tmp_path / "out" / "model.pt"))
    assert replayed.plans[-1] == record["plan"]


def test_mdp_refuses_a_size_budget(tmp_path):
    from squeeze.prune.budget import BudgetError

    with pytest.raises(BudgetError, match="resolution"):
        api.compress("zoo:digits-cnn", tmp_path / "out", "prune.mdp", budget=Budget(size_bytes=1000), data="digits")


# --- 3D: Conv3d nets, spatial and temporal scales ------------------------------------------------------------


def test_3d_channels_and_scales_equal_the_gated_net_with_those_channels_zeroed():
    """torch-pruning's coupling on Conv3d/BatchNorm3d with the resolution wrappers: pruning a group (a residual
    stream with its downsample projection, the stem with the block that adds to it) computes what the net
    computes with the group's channels gated to zero after every member's BatchNorm, at the same scales."""
    from squeeze.prune.graph import prunable_layers
    from squeeze.prune.multidim import apply_scales, attach_gates
    from testnets import tiny_r3d

    net = tiny_r3d()
    x = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    scales = {"layers.0.0.conv1.0": (2, 2, 2), "layers.1.0.conv2.0": (1, 2, 2), "layers.2.0.conv1.0": (2, 1, 1)}
    groups = {g.name: g for g in prunable_layers(net, x[:1])}
    keep = {"stem.0": list(range(0, 16, 2)), "layers.1.0.conv2.0": list(range(8, 32))}
    pruned = apply_multidim(net, _plan(None, scales, keep), x[:1])
    gated = apply_scales(copy.deepcopy(net), scales, x[:1])
    members = {m: root for root in keep for m in (root, *groups[root].coupled)}
    gates, _, _ = attach_gates(gated, list(members), x[:1])
    with torch.no_grad():
        for name, gate in gates.items():
            mask = torch.zeros_like(gate)
            mask[keep[members[name]]] = 1
            gate.copy_(mask)
        torch.testing.assert_close(pruned.eval()(x), gated.eval()(x), rtol=1e-4, atol=1e-5)
    assert pruned.layers[1][0].conv2[0].conv.out_channels == 24 and pruned.stem[0].out_channels == 8


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_exported_3d_mdp_net_matches_torch(mode):
    from testnets import tiny_r3d

    x = torch.randn(2, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plan = MultiDimPlan({"stem.0": (2, 1, 1), "layers.1.0.conv1.0": (2, 2, 2)},
                        ChannelPlan({"layers.0.0.conv1.0": 8}, {"layers.0.0.conv1.0": list(range(8))}, round_to=1),
                        mode)
    pruned = apply_multidim(tiny_r3d(), plan, x[:1])
    art = export_onnx(LoadedModel("mdp3d", "factory", (1, 3, 4, 16, 16), pruned), use_cache=False)
    assert art.parity.passed
    with torch.no_grad():
        np.testing.assert_allclose(run_batched(art.path, x.numpy()), pruned.eval()(x).numpy(), rtol=1e-3, atol=1e-4)


def test_3d_macs_prices_count_time_and_space():
    conv = nn.Conv3d(8, 16, 3, padding=1)
    shapes = {"c": (1, 8, 4, 8, 8)}
    module = nn.Sequential()
    module.add_module("c", conv)
    full, space, time_ = branch_prices(module, shapes, {"c": [(1, 1, 1), (1, 2, 2), (2, 1, 1)]}, "macs").prices["c"]
    assert full == 8 * 16 * 27 * 4 * 8 * 8 and space == full / 4 and time_ == full / 2


def test_fashion_motion_clips_are_deterministic_and_labelled_by_direction():
    from squeeze.data import FASHION_MNIST_DIR, MOTION_DIRECTIONS, load_data

    if not FASHION_MNIST_DIR.exists():
        pytest.skip("the Debian package dataset-fashion-mnist is not installed")
    data = load_data("fashion-motion")
    assert data.input_shape == (1, 1, 8, 32, 32) and data.num_classes == 8
    assert (len(data.train), len(data.val), len(data.test)) == (12000, 1000, 2000)
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))  # (2, H, W): y, x
    for i in range(8):
        clip, label = data.train[i]
        assert torch.equal(clip, data.train[i][0]) and label == i
        ink = clip[0] - clip[0].min()  # (T, H, W)
        centre = (grid[None] * ink[:, None]).sum((2, 3)) / ink.sum((1, 2))[:, None]  # (T, 2)
        dy, dx = (centre[-1] - centre[0]).tolist()
        angle = np.degrees(np.arctan2(-dy, dx)) % 360
        assert MOTION_DIRECTIONS[round(angle / 45) % 8] == MOTION_DIRECTIONS[label]


def test_3d_layers_are_table_entries_that_rebuild_as_themselves():
    """Conv3d, BatchNorm3d and the 3D pools and resizes of an MDP net are lookup-table entries: each entry's
    standalone model has that one configuration again."""
    from testnets import tiny_r3d

    x = torch.zeros(1, 3, 4, 16, 16)
    plan = MultiDimPlan({"layers.0.0.conv1.0": (2, 2, 2)}, None, "bilinear")
    configs = layer_configs(apply_multidim(tiny_r3d(), plan, x), x)
    assert configs["layers.0.0.conv1.0.conv"].key == "conv3d_in16x2x4x4_out16_k3x3x3_s1x1x1_p1x1x1_g1"
    assert configs["layers.0.0.conv1.0.pool"].key == "avgpool3d_in16x4x8x8_k2x2x2"
    assert configs["layers.0.0.conv1.0.upsample"].key == "resize3d_trilinear_4d_in16x2x4x4_out4x8x8"
    # the BatchNorm runs inside, before the resize: it reads the conv's output and folds into it
    assert not any(c.op == "bn3d" for c in configs.values())
    assert isinstance(apply_multidim(tiny_r3d(), plan, x).layers[0][0].conv1[1], nn.Identity)
    for cfg in {c.key: c for c in configs.values()}.values():
        module, shape = cfg.build()
        (again,) = layer_configs(module, torch.zeros(shape)).values()
        assert again == cfg


def test_width_effects_price_a_pruned_3d_net():
    """A Conv3d group at a smaller width: the configurations a table prices are those of the pruned net."""
    from squeeze.prune.effects import WidthEffects
    from squeeze.prune.engine import apply_plan, make_plan
    from squeeze.prune.graph import prunable_layers
    from testnets import tiny_r3d

    net, x = tiny_r3d(), torch.zeros(1, 3, 4, 16, 16)
    effects = WidthEffects(net, x)
    for layer in [g for g in prunable_layers(net, x) if g.prunable][::3]:
        width = layer.out_channels // 2
        pruned = apply_plan(net, make_plan(net, x, {layer.name: width}, round_to=1), x)
        assert effects.configs_at(layer.name, width) == layer_configs(pruned, x), layer.name


@pytest.mark.slow
def test_mdp_on_a_3d_net_searches_time_and_space(tmp_path):
    """prune.mdp on a Conv3d net and fashion-motion clips, with temporal scales allowed: the budget is met, the
    record names (t, h, w) scales, and the checkpoint replays to the exported model."""
    from squeeze.data import FASHION_MNIST_DIR

    if not FASHION_MNIST_DIR.exists():
        pytest.skip("the Debian package dataset-fashion-mnist is not installed")
    options = {"search": {"iterations": 6, "batch_size": 16}, "long_term": {"iterations": 4, "batch_size": 16},
               "temporal_scales": [1, 0.5], "spatial_scales": [1, 0.5]}
    out = tmp_path / "out"
    report = api.compress("testnets:tiny_r3d", out, "prune.mdp", budget=Budget(macs_ratio=0.5),
                          data="fashion-motion", options=options, model_options=api.ModelOptions((1, 3, 8, 32, 32)),
                          measure={"repeat": 3, "warmup": 0, "min_repeat_ms": 0})
    record = report["stages"][0]["record"]
    assert record["budget_met"] and all(len(s) == 3 for s in record["scales"].values())
    assert len(record["candidates"]["stem.0"]) == 4  # (t, s) in {1, 1/2}^2
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = load_model(str(out / "model.pt")).module.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_batched(out / "model.onnx", x), ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", ["nearest", "trilinear"])
@pytest.mark.parametrize("size", [(8, 8, 12), (4, 8, 12), (8, 4, 6)])
def test_a_5d_resize_runs_as_4d_resizes_with_the_same_output(tmp_path, mode, size):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from squeeze.measure.lut import resize

    x = torch.randn(2, 3, 4, 4, 6)
    module = resize(size, mode)
    reference = torch.nn.functional.interpolate(x, size=size, mode=mode,
                                                align_corners=None if mode == "nearest" else False)
    assert torch.allclose(module(x), reference, atol=1e-6)
    path = tmp_path / "resize.onnx"
    torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.value_info, *graph.input]}
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    assert resizes and all(ranks[n.input[0]] == 4 for n in resizes)  # no 5-D Resize kernel runs
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, reference.numpy(), atol=1e-5)
