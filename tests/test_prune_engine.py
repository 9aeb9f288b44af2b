"""The channel-pruning engine: coupling analysis, importance, plans, surgery, checkpoint replay.

The reference for correctness: a pruned net must compute exactly what the unpruned net computes
with the pruned channels forced to zero (conv/linear output rows and biases, BatchNorm gamma and
beta of every pruned channel of every coupled layer). The zeroing below uses torch-pruning's
dependency graph directly, independently of squeeze's engine.
"""

import copy
import json

import pytest
import testnets
import torch
import torch_pruning as tp
from torch import nn
from typer.testing import CliRunner

from squeeze.model import zoo
from squeeze.model.loading import ArchRef, LoadedModel, load_model, module_fingerprint, save_checkpoint
from squeeze.prune import (
    ChannelPlan,
    PlanError,
    PruneError,
    apply_plan,
    compose_plans,
    list_importances,
    make_plan,
    plan_from_json,
    plan_to_json,
    prunable_layers,
    round_width,
    select_channels,
    uniform_plan,
)
from squeeze.model.summary import summarize
from testnets import HELD_OUT_SHAPES, conv_stack

IMAGENET_TEST_SHAPE = (1, 3, 64, 64)  # small inputs keep the zoo models fast; coupling does not depend on H, W
SHAPES = {"digits-cnn": (1, 1, 16, 16), "resnet18": IMAGENET_TEST_SHAPE, "mobilenet_v2": IMAGENET_TEST_SHAPE,
          "densenet121": IMAGENET_TEST_SHAPE}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny inputs leave too little work per op for intra-op threads; on a busy 2-core machine their
    synchronisation multiplied this file's run time by 15. One thread here, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- models -----------------------------------------------------------------------------------------


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics: with running_mean != 0, BN(0) != 0 unless gamma and beta are zeroed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


def zoo_net(name: str) -> nn.Module:
    torch.manual_seed(0)  # the bare factory: digits-cnn untrained, no training in these tests
    return randomize_bn(zoo.get_entry(name).factory().eval())


class GroupedNet(nn.Module):
    """conv -> grouped conv (groups=4) -> conv with bias and no BN -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 16, 1)  # bias, no BN: its pruned channels are zeroed through the bias
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def grouped_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(GroupedNet().eval())


class ScoredNet(nn.Module):
    """1x1 conv (4 -> 4) -> BN -> ReLU -> pool -> classifier: one prunable group with known scores."""

    def __init__(self, rows, gamma, fc_columns) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(rows, dtype=torch.float32).view(4, 4, 1, 1))
            self.bn.weight.copy_(torch.tensor(gamma, dtype=torch.float32))
            self.bn.bias.fill_(1.0)  # keeps every channel active after the ReLU
            self.fc.weight.copy_(torch.tensor(fc_columns, dtype=torch.float32).repeat(3, 1))
        self.eval()

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


class UnusualNet(nn.Module):
    """Layers the engine must report instead of crashing on."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)  # depthwise on the model input
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)  # called twice
        self.unused = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.conv(self.dw(x)))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        return self.fc(x.mean((2, 3)))


class InputResidualNet(nn.Module):
    """x + conv1(x): conv1's channels are pinned by the input's, which no layer produces."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(x + self.conv1(x))).mean((2, 3)))


class FlattenNet(nn.Module):
    """VGG-style head: conv features flattened (C x 4 x 4) into a hidden Linear, then the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 16, 4, 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def zeroed_copy(model: nn.Module, plan: ChannelPlan, x: torch.Tensor, zero_bn: bool = True) -> nn.Module:
    """The unpruned model with every pruned channel's output forced to zero (see module docstring)."""
    model = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for name, kept in plan.kept_indices.items():
        root = model.get_submodule(name)
        drop = sorted(set(range(width(root))) - set(kept))
        fn = tp.prune_linear_out_channels if isinstance(root, nn.Linear) else tp.prune_conv_out_channels
        for item in graph.get_pruning_group(root, fn, drop):
            m = item.dep.target.module
            if not graph.is_out_channel_pruning_fn(item.dep.handler):
                continue  # consumers: their inputs are already zero
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or (
                    zero_bn and isinstance(m, nn.modules.batchnorm._BatchNorm)):
                with torch.no_grad():
                    m.weight[item.idxs] = 0  # conv/linear: output rows (incl. depthwise); BN: gamma
                    if m.bias is not None:
                        m.bias[item.idxs] = 0  # conv bias; BN: beta
    return model


def half_plan(model: nn.Module, x: torch.Tensor, every: int = 1) -> ChannelPlan:
    table = prunable_layers(model, x)
    keep = {name: table[name].out_channels // 2 for name in table.names()[::every]}
    return make_plan(model, x, keep, round_to=8)


# --- coupling analysis ------------------------------------------------------------------------------


def test_resnet18_groups_residual_convs_and_never_the_classifier():
    model = zoo_net("resnet18")
    table = prunable_layers(model, torch.randn(IMAGENET_TEST_SHAPE))
    # stem + stage-1 residual set, one residual set per later stage (rooted at its first conv2), 8 conv1s
    assert len(table.names()) == 12 and table.skipped == ()
    stem = table["stem.0.0"]
    assert stem.coupled == ("stages.0.0.conv2.0", "stages.0.1.conv2.0")
    assert stem.consumers == (
        "stages.0.0.conv1.0", "stages.0.1.conv1.0", "stages.1.0.conv1.0", "stages.1.0.downsample.0")
    assert (stem.out_channels, stem.in_channels, stem.kernel_size, stem.stride) == (64, 3, (7, 7), (2, 2))
    assert stem.input_hw == (64, 64)
    assert table["stages.3.0.conv1.0"].input_hw == (4, 4)
    assert table["stages.1.0.conv2.0"].coupled == ("stages.1.0.downsample.0", "stages.1.1.conv2.0")
    assert not table["fc"].prunable and "model output" in table["fc"].reason
    assert "fc" not in table.names() and table.widths()["stem.0.0"] == 64


def test_mobilenet_v2_depthwise_follows_its_producer():
    table = prunable_layers(zoo_net("mobilenet_v2"), torch.randn(IMAGENET_TEST_SHAPE))
    names = table.names(prunable_only=False)
    assert not any(".conv.1.0" in n and n != "features.1.conv.1.0" for n in names)  # depthwise convs are no roots
    expand = table["features.2.conv.0.0"]
    assert expand.coupled == ("features.2.conv.1.0",) and expand.consumers == ("features.2.conv.2.0",)
    assert table["features.0.0"].coupled == ("features.1.conv.0.0",)  # stem feeds block 1's depthwise directly
    assert not table["classifier.1"].prunable


def test_densenet121_concat_consumers_are_listed():
    table = prunable_layers(zoo_net("densenet121"), torch.randn(IMAGENET_TEST_SHAPE))
    assert len(table.names()) == 120 and not table["classifier"].prunable
    growth = table["features.4.layers.0.1.2"]  # the first dense layer's 3x3 conv: its 32 channels join the concat
    assert growth.out_channels == 32 and growth.coupled == ()
    assert len(growth.consumers) == 6  # the 5 later layers of block 1 and the transition conv


def test_grouped_conv_sets_the_channel_step():
    table = prunable_layers(grouped_net(), torch.randn(1, 3, 16, 16))
    assert table["conv1"].channel_step == 4 and table["conv2"].channel_step == 4 and table["conv3"].channel_step == 1
    assert table["conv2"].groups == 4


def test_unusual_layers_are_reported_not_crashed_on():
    table = prunable_layers(UnusualNet().eval(), torch.randn(1, 3, 8, 8))
    assert [(s.name, s.reason) for s in table.skipped] == [
        ("unused", "not used in the forward pass with the example input")]
    assert not table["dw"].prunable and "reads the model input" in table["dw"].reason
    # `shared` maps conv's channels onto themselves, so it is coupled with conv, whose group cannot shrink
    assert table.root_of("shared") == "conv"
    assert table["conv"].reason == "shared runs 2 times per forward (shared weights)"
    assert not table["fc"].prunable and table.names() == []
    with pytest.raises(PlanError, match="'conv' cannot be pruned: shared runs 2 times"):
        make_plan(UnusualNet(), torch.randn(1, 3, 8, 8), {"conv": 4})


def test_an_add_with_the_model_input_pins_the_channels():
    table = prunable_layers(InputResidualNet().eval(), torch.randn(1, 3, 8, 8))
    assert table["conv1"].reason == "AddBackward0 reads the model input, whose channels are fixed"
    assert table.names() == ["conv2"]


# --- parity with the zeroed-channel model ----------------------------------------------------------


@pytest.mark.parametrize("name,every", [("digits-cnn", 1), ("resnet18", 1), ("mobilenet_v2", 1), ("densenet121", 4)])
def test_pruned_zoo_model_equals_zeroed_channels(name, every):
    model = zoo_net(name)
    x = torch.randn((3, *SHAPES[name][1:]), generator=torch.Generator().manual_seed(1))
    plan = half_plan(model, x[:1], every)
    pruned, zeroed = apply_plan(model, plan, x[:1]), zeroed_copy(model, plan, x[:1])
    with torch.no_grad():
        y_pruned, y_zeroed, y_full = pruned(x), zeroed(x), model(x)
    torch.testing.assert_close(y_pruned, y_zeroed, atol=1e-5, rtol=0)
    assert (y_pruned - y_full).abs().max() > 1e-3  # the pruning did remove something that mattered
    if name == "resnet18":  # zeroing convs alone is not enough: BN would shift the zeros (the test is sensitive)
        conv_only = zeroed_copy(model, plan, x[:1], zero_bn=False)
        with torch.no_grad():
            assert (y_pruned - conv_only(x)).abs().max() > 1e-3


def test_flatten_into_linear_equals_zeroed_channels():
    torch.manual_seed(0)
    model = randomize_bn(FlattenNet().eval())
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    plan = make_plan(model, x[:1], {"conv1": 8, "conv2": 5, "fc1": 12}, round_to=1)
    pruned, zeroed = apply_plan(model, plan, x[:1]), zeroed_copy(model, plan, x[:1])
    assert (pruned.fc1.in_features, pruned.fc1.out_features, pruned.fc2.in_features) == (5 * 16, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=0)
        assert (pruned(x) - model(x)).abs().max() > 1e-3


def test_grouped_conv_pruning_equals_zeroed_channels():
    model = grouped_net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plan = make_plan(model, x[:1], {"conv1": 10, "conv2": 20, "conv3": 5}, round_to=1)
    assert plan.keep == {"conv1": 12, "conv2": 20, "conv3": 5}  # multiples of the 4 channel groups
    for name in ("conv1", "conv2"):  # the same positions in each group of 8
        blocks = [{i % 8 for i in plan.kept_indices[name] if i // 8 == b} for b in range(4)]
        assert all(b == blocks[0] for b in blocks)
    pruned, zeroed = apply_plan(model, plan, x[:1]), zeroed_copy(model, plan, x[:1])
    assert (pruned.conv2.in_channels, pruned.conv2.out_channels, pruned.conv2.groups) == (12, 20, 4)
    assert pruned.conv2.weight.shape == (20, 3, 3, 3)  # (C_out, C_in/groups, kH, kW)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), zeroed(x), atol=1e-5, rtol=0)


# --- held-out architectures (tests/testnets.py: torchvision's structure at small sizes) -------------


def held_out(name: str) -> tuple[nn.Module, torch.Tensor]:
    x = torch.randn((2, *HELD_OUT_SHAPES[name][1:]), generator=torch.Generator().manual_seed(1))
    return randomize_bn(getattr(testnets, name)()), x


def zeroable_groups(name: str, table) -> list[str]:
    """ConvNeXt's LayerNorms normalize over the residual stream's channels: removing one changes the
    statistics of the rest, so there only the MLP hidden groups (Linear -> GELU -> Linear; GELU(0) = 0)
    equal the zeroed model. Everywhere else: every prunable group."""
    return [n for n in table.names() if name != "tiny_convnext" or n.endswith(".block.3")]


@pytest.mark.parametrize("name", sorted(HELD_OUT_SHAPES))
def test_held_out_architecture_equals_zeroed_channels(name):
    model, x = held_out(name)
    table = prunable_layers(model, x[:1])
    names = zeroable_groups(name, table)
    assert len(names) >= 4
    plan = make_plan(model, x[:1], {n: table[n].out_channels // 2 for n in names}, round_to=1)
    pruned, zeroed = apply_plan(model, plan, x[:1]), zeroed_copy(model, plan, x[:1])
    with torch.no_grad():
        y_pruned, y_zeroed, y_full = pruned(x), zeroed(x), model(x)
    torch.testing.assert_close(y_pruned, y_zeroed, atol=1e-6, rtol=0)
    assert (y_pruned - y_full).abs().max() > 1e-4 * y_full.abs().max()  # the pruning removed something


def test_shufflenet_prunes_around_the_channel_shuffle():
    """The channels of the concat -> shuffle -> split stream are interleaved by a view/transpose/view that
    torch-pruning cannot map; that stream stays whole, the branches' hidden widths, stem and head prune."""
    model, x = held_out("tiny_shufflenet_v2")
    table = prunable_layers(model, x[:1])
    hidden = [f"stage{s}.{u}.branch2.0.0" for s in (2, 3, 4) for u in (0, 1)]
    assert table.names() == ["conv1.0", *hidden, "conv5.0"]
    pinned = [layer for layer in table if not layer.prunable and layer.name != "fc"]
    assert [p.name for p in pinned] == [f"stage{s}.0.branch1.1.0" for s in (2, 3, 4)]
    assert all("ViewBackward0, a reshape that moves channels" in p.reason for p in pinned)
    # the stream's group: the last conv of every branch of the stage and the next stage's depthwise conv
    assert pinned[0].coupled == ("stage2.0.branch2.2.0", "stage2.1.branch2.2.0", "stage3.0.branch1.0.0")
    assert table["stage2.0.branch2.0.0"].coupled == ("stage2.0.branch2.1.0",)  # its depthwise conv


def test_full_width_shufflenet_traces():
    """At torchvision's widths, torch-pruning's shape inference through the shuffle divided by zero."""
    table = prunable_layers(testnets.shufflenet_v2(), torch.randn(1, 3, 32, 32))
    assert len(table.names()) == 18 and table["conv5.0"].out_channels == 1024


def test_convnext_layer_scale_and_channels_last_norm_shrink_with_the_stream():
    model, x = held_out("tiny_convnext")
    plan = uniform_plan(model, x[:1], 0.5, round_to=1)
    pruned = apply_plan(model, plan, x[:1])
    block = pruned.features[1][0]
    width = plan.keep["features.0.0"]  # the stem's group: stage 1's residual stream
    assert width == 12 and block.layer_scale.shape == (width, 1, 1)  # (C, 1, 1) parameter, dim 0
    assert block.block[0].weight.shape == (width, 1, 7, 7) and block.block[2].normalized_shape == (width,)
    assert (block.block[3].in_features, block.block[5].out_features) == (width, width)
    assert pruned.features[2][0].normalized_shape == (width,)  # the downsample's LayerNorm2d
    with torch.no_grad():
        assert pruned(x).shape == (2, 10)


def test_r3d_conv3d_and_batchnorm3d_are_pruned():
    model, x = held_out("tiny_r3d")
    table = prunable_layers(model, x[:1])
    stem = table["stem.0"]
    assert (stem.type, stem.kernel_size, stem.stride, stem.input_hw) == ("Conv3d", (3, 7, 7), (1, 2, 2), (4, 16, 16))
    assert stem.coupled == ("layers.0.0.conv2.0",) and table.skipped == ()
    assert table["layers.1.0.conv2.0"].coupled == ("layers.1.0.downsample.0",)
    pruned = apply_plan(model, uniform_plan(model, x[:1], 0.5), x[:1])
    conv = pruned.layers[1][0].conv1
    assert conv[0].weight.shape == (16, 8, 3, 3, 3)  # (C_out, C_in, kT, kH, kW)
    assert conv[1].num_features == 16 and pruned.fc.in_features == 64


def test_conv3d_macs_are_counted_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(3, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
                          nn.Conv3d(16, 16, (1, 3, 3), padding=(0, 1, 1)), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten(), nn.Linear(16, 4)).eval()
    loaded = LoadedModel("c3d", "factory", (1, 3, 4, 8, 8), model)
    voxels = 4 * 8 * 8  # (T, H, W) kept by the paddings
    assert summarize(loaded).macs == 16 * 3 * 27 * voxels + 16 * 16 * 9 * voxels + 16 * 4
    x = loaded.example_input()
    loaded.module = apply_plan(model, make_plan(model, x, {"0": 8, "3": 8}), x)
    assert summarize(loaded).macs == 8 * 3 * 27 * voxels + 8 * 8 * 9 * voxels + 8 * 4


# The slowest two are opt-in (-m slow): the width-effects test below covers their graphs by default.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("tiny_inception_v3", "tiny_convnext")
                                  else n for n in sorted(HELD_OUT_SHAPES)])
def test_cli_prunes_held_out_architecture_to_half_the_macs(tmp_path, name):
    from squeeze.cli.app import app

    target = tmp_path / "quick.yaml"  # a short protocol: the latencies here are not under test
    target.write_text("name: quick\nruntime: onnxruntime\nthreads: 1\n"
                      "protocol: {warmup: 1, repeat: 3, min_repeat_ms: 1}\n")
    out = tmp_path / "out"
    shape = ",".join(map(str, HELD_OUT_SHAPES[name]))
    r = CliRunner().invoke(app, ["prune", f"testnets:{name}", "--method", "uniform", "--macs", "0.5x",
                                 "--input-shape", shape, "--target", str(target), "--out", str(out)])
    assert r.exit_code == 0, (r.stdout, r.stderr)
    rep = json.loads((out / "report.json").read_text())
    assert rep["final"]["macs"] <= 0.5 * rep["original"]["macs"]
    parity = rep["artifact"]["parity"]  # the pruned model's ONNX export vs torch
    assert parity["passed"] and parity["max_rel_err"] < 1e-3
    not_pruned = rep["stages"][0]["record"]["not_pruned"]
    assert "model output" in not_pruned.pop({"tiny_convnext": "classifier.2"}.get(name, "fc"))
    if name == "tiny_shufflenet_v2":  # the three stages' shuffled streams
        assert len(not_pruned) == 3 and all("channel shuffle" in why for why in not_pruned.values())
    else:
        assert not_pruned == {}
    back = load_model(str(out / "model.pt"))  # the plan replays on the freshly built architecture
    assert sum(p.numel() for p in back.module.parameters()) == rep["final"]["params"] < rep["original"]["params"]


# --- widths and rounding ----------------------------------------------------------------------------


def test_round_width():
    assert round_width(13, 64) == 16 and round_width(3, 64) == 8 and round_width(60, 64) == 64
    assert round_width(61, 62) == 62 and round_width(5, 6) == 6  # never above the current width
    assert round_width(13, 64, round_to=1) == 13
    assert round_width(5, 32, round_to=1, step=4) == 8 and round_width(5, 32, round_to=8, step=4) == 8
    assert round_width(9, 24, round_to=2, step=3) == 12  # lcm(2, 3) = 6


def test_uniform_plan_gives_exact_rounded_widths_and_keeps_io():
    model = zoo_net("resnet18")
    x = torch.randn(IMAGENET_TEST_SHAPE)
    plan = uniform_plan(model, x, 0.3)  # 64 -> 19.2 -> 24, 128 -> 40, 256 -> 80, 512 -> 160
    assert plan.keep["stem.0.0"] == 24 and plan.keep["stages.1.0.conv1.0"] == 40
    assert plan.keep["stages.2.0.conv2.0"] == 80 and plan.keep["stages.3.1.conv1.0"] == 160
    pruned, table = apply_plan(model, plan, x), prunable_layers(model, x)
    assert pruned.stem[0][0].in_channels == 3  # the input's channels never change
    assert pruned.fc.out_features == 1000 and pruned.fc.in_features == 160
    for name, k in plan.keep.items():
        layer = table[name]
        for member in (name, *layer.coupled):
            assert width(pruned.get_submodule(member)) == k
        for member in layer.consumers:
            m = pruned.get_submodule(member)
            assert (m.in_features if isinstance(m, nn.Linear) else m.in_channels) == k
    assert pruned.stages[1][0].conv2[1].num_features == 160 // 4  # BN follows its conv
    exact = uniform_plan(model, x, 0.3, round_to=1)
    assert exact.keep["stem.0.0"] == 20 and exact.keep["stages.3.1.conv1.0"] == 154


def test_make_plan_rounds_up_and_skips_layers_that_would_not_shrink():
    model = zoo_net("digits-cnn")
    x = torch.randn(SHAPES["digits-cnn"])
    plan = make_plan(model, x, {"conv2.0": 13, "conv1.0": 15, "conv3.0": 64})
    assert plan.keep == {"conv2.0": 16}  # 15 -> 16 = all of conv1's channels; 64 = all of conv3's
    assert len(plan.kept_indices["conv2.0"]) == 16
    pruned = apply_plan(model, plan, x)
    assert pruned.conv2[0].out_channels == 16 and pruned.conv3[0].in_channels == 16


def test_apply_plan_does_not_touch_its_input():
    model = zoo_net("digits-cnn").train()
    x = torch.randn(SHAPES["digits-cnn"])
    before = module_fingerprint(model)
    pruned = apply_plan(model, uniform_plan(model, x, 0.5), x)
    assert module_fingerprint(model) == before and model.training and pruned.training
    assert model.conv1[0].out_channels == 16 and pruned.conv1[0].out_channels == 8


def test_frozen_parameters_stay_frozen():
    model = zoo_net("digits-cnn")
    model.conv1.requires_grad_(False)
    x = torch.randn(SHAPES["digits-cnn"])
    pruned = apply_plan(model, uniform_plan(model, x, 0.5), x)
    assert not pruned.conv1[0].weight.requires_grad and pruned.conv2[0].weight.requires_grad


def test_macs_shrink_as_computed_by_hand():
    model = conv_stack(layers=2, channels=32)  # conv 3->32 (3x3), conv 32->32 (3x3), fc 32->4, at 16x16
    loaded = LoadedModel("stack", "factory", (1, 3, 16, 16), model)
    assert summarize(loaded).macs == 32 * 3 * 9 * 256 + 32 * 32 * 9 * 256 + 32 * 4
    plan = make_plan(model, loaded.example_input(), {"0": 16, "2": 16})
    loaded.module = apply_plan(model, plan, loaded.example_input())
    assert summarize(loaded).macs == 16 * 3 * 9 * 256 + 16 * 16 * 9 * 256 + 16 * 4


def test_resnet18_half_width_has_about_a_quarter_of_the_macs():
    model = zoo_net("resnet18")
    loaded = LoadedModel("r18", "zoo", IMAGENET_TEST_SHAPE, model)
    full = summarize(loaded).macs
    loaded.module = apply_plan(model, uniform_plan(model, loaded.example_input(), 0.5), loaded.example_input())
    assert 0.22 < summarize(loaded).macs / full < 0.32  # convs scale by in x out ~ 1/4; stem and fc by 1/2


# --- importance -------------------------------------------------------------------------------------

# Rows: L1 = 4, 3, 0.5, 2.1; squared L2 = 4, 9, 0.25, 4.41. Equal BN gammas and fc columns add the same to
# every channel's group score, so the conv rows decide.
ROWS = [[1, 1, 1, 1], [3, 0, 0, 0], [0.5, 0, 0, 0], [2.1, 0, 0, 0]]


@pytest.mark.parametrize("importance,gamma,fc_columns,expected", [
    ("l1", [1, 1, 1, 1], [0.1] * 4, [0, 1]),
    ("l2", [1, 1, 1, 1], [0.1] * 4, [1, 3]),
    ("bn_scale", [0.1, 0.2, 3.0, 2.0], [0.1] * 4, [2, 3]),
    # channels 1 and 3 do not reach the output: zero gradient, zero Taylor score, although large weights
    ("taylor", [1, 1, 1, 1], [0.1, 0.0, 0.1, 0.0], [0, 2]),
])
def test_each_criterion_keeps_the_expected_channels(importance, gamma, fc_columns, expected):
    model = ScoredNet(ROWS, gamma, fc_columns)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 6, 6, generator=g)
    data = (torch.randn(8, 4, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
    plan = make_plan(model, x, {"conv": 2}, importance=importance, round_to=1, data=data)
    assert plan.kept_indices == {"conv": expected} and plan.importance == importance
    assert model.conv.weight.grad is None  # gradients were computed on a copy


def test_criteria_registry_lists_the_builtins():
    assert [c.name for c in list_importances()] == ["bn_scale", "l1", "l2", "taylor"]
    assert [c.name for c in list_importances() if c.needs_data] == ["taylor"]


def test_taylor_on_a_residual_net_with_batches():
    model = zoo_net("digits-cnn")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    plan = uniform_plan(model, batches[0][0][:1], 0.5, importance="taylor", data=batches)
    assert plan.keep == {"conv1.0": 8, "conv2.0": 16, "conv3.0": 32, "conv5.0": 64}


def test_select_channels_ties_and_blocks():
    assert select_channels(torch.tensor([1.0, 3.0, 3.0, 0.0]), 2) == [1, 2]
    assert select_channels(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]  # ties: lower index first
    # two blocks of 3: mean per position = [2.5, 1, 4.5] -> positions 0 and 2 in both blocks
    assert select_channels(torch.tensor([0.0, 1.0, 4.0, 5.0, 1.0, 5.0]), 4, step=2) == [0, 2, 3, 5]


# --- plans: JSON, checkpoints, composition -----------------------------------------------------------


def test_plan_json_round_trip():
    model = zoo_net("digits-cnn")
    plan = uniform_plan(model, torch.randn(SHAPES["digits-cnn"]), 0.5, importance="l2")
    text = json.dumps(plan_to_json(plan))
    back = plan_from_json(text)
    assert back == plan and plan_from_json(json.loads(text)) == plan
    d = json.loads(text)
    assert (d["kind"], d["version"], d["round_to"], d["importance"]) == ("channels", 1, 8, "l2")
    assert set(d["keep"]) == set(d["kept_indices"]) == {"conv1.0", "conv2.0", "conv3.0", "conv5.0"}


@pytest.mark.parametrize("name", ["digits-cnn", "densenet121"])
def test_pruned_checkpoint_reloads_to_identical_outputs(tmp_path, name):
    entry = zoo.get_entry(name)
    model = zoo_net(name)
    x = torch.randn(SHAPES[name])
    plan = half_plan(model, x, every=4 if name == "densenet121" else 1)
    pruned = apply_plan(model, plan, x)
    src = LoadedModel(name, "zoo", SHAPES[name], pruned, arch=ArchRef(entry.arch_ref), plans=[plan.to_json()])
    path = tmp_path / "pruned.pt"
    save_checkpoint(path, src)
    raw = torch.load(path, weights_only=True)  # plain data and tensors only: no pickled classes
    assert raw["plans"] == [plan_to_json(plan)]
    back = load_model(str(path))
    assert back.plans == [plan_to_json(plan)]
    batch = torch.randn((2, *SHAPES[name][1:]))
    with torch.no_grad():
        assert torch.equal(back.module(batch), pruned(batch))


def test_composed_plans_equal_pruning_twice():
    model = zoo_net("digits-cnn")
    x = torch.randn(SHAPES["digits-cnn"])
    first = make_plan(model, x, {"conv3.0": 48, "conv1.0": 8})
    once = apply_plan(model, first, x)
    then = make_plan(once, x, {"conv3.0": 24, "conv2.0": 16}, importance="l2")
    twice = apply_plan(once, then, x)
    both = compose_plans(first, then)
    assert both.keep == {"conv1.0": 8, "conv3.0": 24, "conv2.0": 16}
    assert set(both.kept_indices["conv3.0"]) <= set(first.kept_indices["conv3.0"])
    direct = apply_plan(model, both, x)
    assert module_fingerprint(direct) == module_fingerprint(twice)


# --- errors -----------------------------------------------------------------------------------------


@pytest.fixture
def digits():
    return zoo_net("digits-cnn"), torch.randn(SHAPES["digits-cnn"])


def test_unknown_layer_lists_the_valid_ones(digits):
    model, x = digits
    valid = "Prunable layers: conv1.0, conv2.0, conv3.0, conv5.0"
    with pytest.raises(PlanError, match=rf"Unknown prunable layer 'conv9'.*{valid}"):
        make_plan(model, x, {"conv9": 8})
    with pytest.raises(PlanError, match="Did you mean 'conv2.0'"):
        make_plan(model, x, {"conv2": 8})


def test_coupled_layer_and_classifier_are_explained(digits):
    model, x = digits
    with pytest.raises(PlanError, match=r"'conv4.0' is pruned together with 'conv3.0'.*Set the width on 'conv3.0'"):
        make_plan(model, x, {"conv4.0": 32})
    with pytest.raises(PlanError, match=r"'fc' cannot be pruned: its output is the model output"):
        make_plan(model, x, {"fc": 5})


@pytest.mark.parametrize("keep,message", [
    ({"conv2.0": 0}, r"keep\['conv2.0'\] must be a positive number of channels, got 0"),
    ({"conv2.0": 40}, r"keep\['conv2.0'\] = 40 is more than the layer's 32 channels"),
    ({"conv2.0": 8.5}, r"must be a positive number of channels, got 8.5"),
    (0.0, r"ratio must be in \(0, 1\], got 0.0"),
    (1.5, r"ratio must be in \(0, 1\], got 1.5"),
    ("half", r"keep must be \{layer name: channels\} or a ratio"),
])
def test_impossible_widths(digits, keep, message):
    model, x = digits
    with pytest.raises(PlanError, match=message):
        make_plan(model, x, keep)


def test_bad_criterion_and_missing_data(digits):
    model, x = digits
    with pytest.raises(PruneError, match="Unknown importance criterion 'l3'.*Valid criteria: bn_scale, l1, l2, taylor"):
        make_plan(model, x, 0.5, importance="l3")
    with pytest.raises(PruneError, match="'taylor' importance needs labelled data"):
        make_plan(model, x, 0.5, importance="taylor")
    with pytest.raises(PruneError, match="needs labelled data: an \\(x, y\\) batch"):
        make_plan(model, x, 0.5, importance="taylor", data=[1, 2, 3])
    with pytest.raises(PlanError, match="round_to must be an integer >= 1"):
        make_plan(model, x, 0.5, round_to=0)


def test_bn_scale_without_batchnorm_is_a_clear_error():
    model = conv_stack(2, 32)
    with pytest.raises(PruneError, match="'bn_scale' importance has nothing to score in layer '0'"):
        make_plan(model, torch.randn(1, 3, 8, 8), {"0": 16}, importance="bn_scale")


def test_bad_plans_are_rejected(digits):
    model, x = digits
    good = plan_to_json(make_plan(model, x, {"conv2.0": 16}))
    cases = [
        ({**good, "kind": "bits"}, "plan.kind is 'bits', expected 'channels'"),
        ({**good, "version": 9}, "plan.version 9 is not supported"),
        ({**good, "kept_indices": {"conv2.0": [3, 1]}}, r"must be sorted, distinct channel indices"),
        ({**good, "kept_indices": {"conv2.0": list(range(15))}}, r"lists 15 channels but plan.keep says 16"),
        ({**good, "kept_indices": {}}, "name different layers: conv2.0"),
        ("{not json", "not valid JSON"),
    ]
    for bad, message in cases:
        with pytest.raises(PlanError, match=message):
            apply_plan(model, bad, x)
    out_of_range = {**good, "kept_indices": {"conv2.0": list(range(15)) + [40]}}
    with pytest.raises(PlanError, match=r"has channel 40, but the layer has 32 channels"):
        apply_plan(model, out_of_range, x)
    too_wide = {**good, "keep": {"conv1.0": 24}, "kept_indices": {"conv1.0": list(range(24))}}
    with pytest.raises(PlanError, match=r"plan.keep\['conv1.0'\] = 24 exceeds the layer's 16 channels"):
        apply_plan(model, too_wide, x)
    with pytest.raises(PlanError, match="Unknown prunable layer 'nope'"):
        apply_plan(model, {**good, "keep": {"nope": 1}, "kept_indices": {"nope": [0]}}, x)


def test_grouped_conv_plan_must_keep_the_same_positions_per_group():
    model, x = grouped_net(), torch.randn(1, 3, 16, 16)
    uneven = {"kind": "channels", "version": 1, "keep": {"conv1": 4}, "kept_indices": {"conv1": [0, 8, 16, 25]}}
    with pytest.raises(PlanError, match="keeps different channels in the 4 channel groups"):
        apply_plan(model, uneven, x)
    odd = {"kind": "channels", "version": 1, "keep": {"conv1": 6}, "kept_indices": {"conv1": list(range(6))}}
    with pytest.raises(PlanError, match="is not a multiple of 4"):
        apply_plan(model, odd, x)


# --- pricing a proposal without pruning ------------------------------------------------------------


# R3D is left out: lookup tables price Conv2d, Linear and BatchNorm2d layers only.
@pytest.mark.parametrize("name", ["digits-cnn", "resnet18", "mobilenet_v2", "grouped",
                                  pytest.param("densenet121", marks=pytest.mark.slow),
                                  "tiny_shufflenet_v2", "tiny_convnext", "tiny_inception_v3"])
def test_width_effects_equal_the_layer_configs_of_the_pruned_model(name):
    """The configurations a lookup table prices for "group at width w" are those of the model really
    pruned to w, for residual adds (digits-cnn: a conv that reads the stream it adds to), depthwise convs,
    concatenations (pre-activation BN), grouped convs, split + shuffle, channels-last Linear layers."""
    from squeeze.measure.lut import layer_configs
    from squeeze.prune.effects import WidthEffects

    if name in HELD_OUT_SHAPES:
        model, x = held_out(name)
        x = x[:1]
    else:
        model = GroupedNet().eval() if name == "grouped" else zoo_net(name)
        x = torch.randn(SHAPES.get(name, (1, 3, 16, 16)))
    effects = WidthEffects(model, x)
    table = prunable_layers(model, x)
    layers = [layer for layer in table if layer.prunable]
    for layer in layers[:: max(1, len(layers) // 6)]:  # a spread of groups: stem, middle, last
        width = round_width(layer.out_channels // 2, layer.out_channels, 8, layer.channel_step)
        pruned = apply_plan(model, make_plan(model, x, {layer.name: width}), x)
        assert effects.configs_at(layer.name, width) == layer_configs(pruned, x), layer.name
