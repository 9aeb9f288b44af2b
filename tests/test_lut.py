import pytest
import torch
from torch import nn

from squeeze.measure.lut import LatencyTable, LayerConfig, LutEntry, TableOracle, layer_configs
from squeeze.measure.protocol import Protocol
from squeeze.model.loading import load_model
from squeeze.target import load_target

HOST = load_target("host-cpu")
FAST = Protocol.for_target(HOST, repeat=5, warmup=2, min_repeat_ms=2)


@pytest.fixture
def quiet(monkeypatch):
    """The table's anchor reads the machine quiet: a loaded test machine must not turn a recalibration down."""
    monkeypatch.setattr(LatencyTable, "contention", lambda self: 1.0)


def test_layer_keys_are_stable_and_readable():
    cfg = LayerConfig("conv2d", 64, 128, 56, 56, (3, 3), (2, 2), (1, 1), 1)
    assert cfg.key == "conv2d_in64x56x56_out128_k3x3_s2x2_p1x1_g1"
    assert LayerConfig("linear", 512, 1000).key == "linear_in512_out1000"
    assert LayerConfig("bn2d", 96, 96, 28, 28).key == "bn2d_relu_in96x28x28"


def test_layer_configs_of_digits_cnn():
    m = load_model("zoo:digits-cnn")
    cfgs = layer_configs(m.module, m.example_input())
    assert [c.op for c in cfgs.values()] == ["conv2d"] * 5 + ["linear"]  # BN after a conv folds: not listed
    assert cfgs["conv3.0"].key == "conv2d_in32x8x8_out64_k3x3_s1x1_p1x1_g1"


def test_preactivation_bn_is_its_own_layer():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1))
    cfgs = layer_configs(net, torch.zeros(1, 3, 10, 10))
    assert [n for n, c in cfgs.items() if c.op == "bn2d"] == ["3"]  # "1" reads the conv output and folds


def test_built_layer_matches_config():
    cfg = LayerConfig("conv2d", 16, 16, 12, 12, (3, 3), (1, 1), (1, 1), 16)
    module, shape = cfg.build()
    (again,) = layer_configs(module, torch.zeros(shape)).values()
    assert again == cfg


def test_table_measures_once_and_reuses(monkeypatch):
    table = LatencyTable(HOST, FAST)
    cfgs = [LayerConfig("conv2d", 8, c, 8, 8, (3, 3), (1, 1), (1, 1), 1) for c in (8, 16)]
    first = table.entries(cfgs)
    assert set(first) == {c.key for c in cfgs} and all(e.count == 5 and e.median_ms > 0 for e in first.values())
    monkeypatch.setattr(LatencyTable, "measure", lambda *a, **k: pytest.fail("re-measured a stored entry"))
    assert LatencyTable(HOST, FAST).entries(cfgs) == first


def test_a_batch_of_layers_measured_on_a_contended_machine_is_measured_again(monkeypatch):
    from squeeze.measure import lut
    from squeeze.measure.bench import Measurement

    # Per run: the anchor's ms and each layer's time over it. The anchor alone (the time base), batch 1, then
    # batch 2 twice: its first run contended (the anchor 1.5x slow, and slowed more than the layer).
    runs, sizes = iter([(0.1, None), (0.1, 3.0), (0.15, 2.0), (0.1, 3.0)]), []

    def fake(artifacts, target, protocol):
        anchor_ms, ratio = next(runs)
        sizes.append(len(artifacts))
        times = [anchor_ms] + [anchor_ms * ratio for _ in artifacts[1:]]
        return [Measurement(a.sha256, target.name, {}, [ms] * 5, 1, {}, "run") for a, ms in zip(artifacts, times)]

    monkeypatch.setattr(lut, "interleaved", fake)
    monkeypatch.setattr(lut, "_BATCH", 1)
    table = LatencyTable(HOST, FAST.model_copy(update={"seed": 7}))  # a scope of its own: no stored anchor
    entries = table.measure([LayerConfig("conv2d", 8, c, 8, 8, (3, 3), (1, 1), (1, 1), 1) for c in (8, 16)])
    assert sizes == [1, 2, 2, 2]  # batch 2 ran again
    assert [e.median_ms for e in entries] == pytest.approx([0.3, 0.3])  # the quiet run's 3x the anchor, not 2x


def test_two_widths_of_a_layer_are_timed_side_by_side_less_the_per_call_overhead(monkeypatch):
    from squeeze.measure import lut
    from squeeze.measure.bench import Measurement

    base, wide, wider = (LayerConfig("conv2d", 8, c, 8, 8, (3, 3), (1, 1), (1, 1), 1) for c in (8, 16, 32))
    table = LatencyTable(HOST, FAST.model_copy(update={"seed": 11}))  # a scope of its own
    # per layer, two rounds: the second twice as slow (load that came, for all of them)
    per_run = {table._artifact(c).sha256: (c.key, ms) for c, ms in
               ((lut.OVERHEAD, [1.0, 2.0]), (base, [3.0, 6.0]), (wide, [5.0, 10.0]), (wider, [9.0, 18.0]))}
    batches = []

    def fake(artifacts, target, protocol):
        batches.append([per_run[a.sha256][0] for a in artifacts])
        return [Measurement(a.sha256, target.name, {}, per_run[a.sha256][1], 1, {}, "run") for a in artifacts]

    monkeypatch.setattr(lut, "interleaved", fake)
    ratios = table.ratios([(base, wide), (base, wider), (base, wide)])
    assert batches == [[lut.OVERHEAD.key, base.key, wide.key, wider.key]]  # one run, the base timed once
    assert ratios == {(base.key, wide.key): pytest.approx(2.0), (base.key, wider.key): pytest.approx(4.0)}
    monkeypatch.setattr(lut, "interleaved", lambda *a: pytest.fail("re-timed a stored ratio"))
    assert LatencyTable(HOST, FAST.model_copy(update={"seed": 11})).ratios([(base, wider)]) == \
        {(base.key, wider.key): pytest.approx(4.0)}


def test_a_layer_timed_side_by_side_at_four_times_the_work_reads_slower():
    table = LatencyTable(HOST, FAST)
    small, big = (LayerConfig("conv2d", 32, c, 28, 28, (3, 3), (1, 1), (1, 1), 1) for c in (32, 128))
    assert table.ratios([(small, big)])[(small.key, big.key)] > 1.5


def test_table_orders_layer_costs():
    table = LatencyTable(HOST, FAST)
    small, big = (LayerConfig("conv2d", 16, c, 32, 32, (3, 3), (1, 1), (1, 1), 1) for c in (16, 256))
    e = table.entries([small, big])
    # 16x the MACs; the margin leaves room for a loaded machine (readings of one run, against the anchor)
    assert e[big.key].median_ms > 2 * e[small.key].median_ms


def test_table_oracle_is_anchored_on_reference_and_recalibrates(quiet):
    ref = load_model("zoo:digits-cnn")
    oracle = TableOracle(LatencyTable(HOST, FAST), ref, in_context=False)  # standalone entries and the constant
    p = oracle.predict(ref)
    assert p.total_ms == pytest.approx(oracle.reference_ms) and p.constant_ms == 0.0
    assert set(p.per_layer_ms) == {"conv1.0", "conv2.0", "conv3.0", "conv4.0", "conv5.0", "fc"}

    from squeeze.model.zoo.digits_cnn import digits_cnn

    half = load_model("zoo:digits-cnn")
    # A quarter of the widths: its layers price about half the original's (at width 0.5 a loaded machine's
    # table once read them within 4% of it, where the fit rightly refuses to divide noise by noise).
    half.module = digits_cnn(width=0.25).eval()
    # A stand-in measurement with a ratio the fit can reach: the one a constant equal to the layers gives.
    q = oracle.predict(half).layers_ms / oracle.reference_layers_ms
    rho = (q + 1) / 2

    class Fixed:
        def latency_ms(self, model):
            return oracle.reference_ms * (1.0 if model is ref else rho)

    oracle.measured = Fixed()
    assert oracle.recalibrate(half) == pytest.approx(rho * oracle.reference_ms)
    assert oracle.constant_ms == pytest.approx(oracle.reference_layers_ms)
    assert oracle.latency_ms(half) == pytest.approx(rho * oracle.reference_ms)  # the fit reproduces the measurement


def test_a_measurement_of_a_contended_machine_recalibrates_nothing(caplog, quiet):
    from squeeze.measure.oracle import FixedOracle
    from squeeze.prune.tables import _pruned

    model = _tiny_mobilenet()
    # a scope of its own: the pruned model's in-context entries stay out of the other tests' reference
    oracle = TableOracle(LatencyTable(HOST, FAST.model_copy(update={"seed": 12})), model, FixedOracle(1.0))
    pruned = _pruned(model, {"1.0.0": 16})
    before = oracle.predict(pruned)

    class Busy(FixedOracle):
        contention = 1.5  # every try of its last ratio ran 1.5x slower than the quietest run

    oracle.measured = Busy(0.5)
    assert oracle.recalibrate(pruned) == 0.5
    assert oracle.constant_ms == 0.0 and oracle.predict(pruned) == before  # nothing fitted, nothing profiled
    assert "not recalibrated" in caplog.text and "1.50x slower" in caplog.text
    Busy.contention = 1.15  # not contended enough to read again, but too much to fit every later price on
    assert oracle.recalibrate(pruned) == 0.5 and oracle.recalibrations == 0 and "1.15x slower" in caplog.text
    oracle.measured = FixedOracle(0.5)  # quiet again
    oracle.recalibrate(pruned)
    assert oracle.predict(pruned).total_ms == pytest.approx(0.5, rel=1e-6)


def test_the_table_s_anchor_tells_a_contended_machine_against_its_quietest_run_in_any_process(monkeypatch, caplog):
    from squeeze.measure import lut
    from squeeze.measure.bench import Measurement
    from squeeze.measure.oracle import FixedOracle

    medians = iter([0.10, 0.08, 0.12, 0.12])  # the anchor alone: ms per run

    def fake(artifacts, target, protocol):
        return [Measurement(a.sha256, target.name, {}, [next(medians)] * 5, 1, {}, "run") for a in artifacts]

    monkeypatch.setattr(lut, "interleaved", fake)
    protocol = FAST.model_copy(update={"seed": 13})  # a scope of its own
    table = LatencyTable(HOST, protocol)
    assert [table.contention(), table.contention()] == [1.0, 1.0]  # each the fastest so far
    # Another process: the quietest run is remembered, so a spell that began before it is seen.
    again = LatencyTable(HOST, protocol)
    assert again.contention() == pytest.approx(1.5)
    # A recalibration whose measuring oracle saw no contention (its first runs were the spell's) fits nothing.
    monkeypatch.setattr(TableOracle, "_price", lambda self, models: [({"fc": 1.0}, {"fc": "standalone"})] * len(models))
    oracle = TableOracle(again, load_model("zoo:digits-cnn"), FixedOracle(1.0), in_context=False)
    oracle.measured = FixedOracle(0.6)
    assert oracle.recalibrate(load_model("zoo:digits-cnn")) == 0.6
    assert oracle.recalibrations == 0 and "1.50x slower" in caplog.text


def test_check_table_reads_a_contended_plan_again_and_recalibrates_last_until_a_quiet_reading_fits(monkeypatch):
    from squeeze.prune import tables

    calls = []

    class StandIn:  # plan 1's first run and plan 0's first recalibration are contended: the original read 8.0 ms
        def __init__(self, reference, target, protocol):
            self.reference, self.reference_ms, self.fastest_ms, self.run_reference_ms = reference, 6.5, 6.5, 6.5

        def latency_ms(self, model):
            calls.append(model)
            self.run_reference_ms = 8.0 if len(calls) in (2, 4) else 6.5
            return 3.0 + len(calls)

        @property
        def contention(self):
            return self.run_reference_ms / self.fastest_ms

    monkeypatch.setattr(tables, "RelativeOracle", StandIn)
    monkeypatch.setattr(TableOracle, "_price", lambda self, models: [({"fc": 1.0}, {"fc": "standalone"})] * len(models))
    monkeypatch.setattr(LatencyTable, "contention", lambda self: 1.0)
    result = tables.check_table(load_model("zoo:digits-cnn"), LatencyTable(HOST, FAST), n_plans=3, in_context=False,
                                fit_on=1)
    reference, p1, p2, p0, p1_again, p0_again = calls
    assert p1_again is p1 and p0_again is p0 and len({id(m) for m in (reference, p0, p1, p2)}) == 4
    assert [r.measured_ms for r in result.rows] == [9.0, 8.0, 6.0]  # the quiet readings
    assert result.contended_plans == [] and result.fitted_plans == [0]
    assert result.rows[0].recalibrated_ms is None and result.rows[1].recalibrated_ms is not None


def test_check_table_reports_table_and_recalibrated_errors():
    import math

    from squeeze.prune.tables import check_table, search_space_configs

    model = load_model("zoo:digits-cnn")
    assert len(search_space_configs(model)) > len(layer_configs(model.module, model.example_input()))
    result = check_table(model, LatencyTable(HOST, FAST), n_plans=3, seed=1, fit_on=1)
    first, *rest = result.rows
    assert first.recalibrated_ms is None and all(r.recalibrated_ms is not None for r in rest)
    assert all(r.measured_ms > 0 and r.predicted_ms > 0 for r in result.rows)
    (med, p90), (rmed, rp90) = result.summary(), result.summary(recalibrated=True)
    assert all(math.isfinite(v) for v in (med, p90, rmed, rp90)) and med <= p90
    assert result.to_json()["rows"][1]["recalibrated_error_pct"] == rest[0].recalibrated_error_pct


def test_a_search_times_its_table_at_the_batch_its_whole_model_readings_use():
    """A run measured at batch 4 prices layers at batch 4: a batch-1 table would be re-fitted to batch-4
    readings by one factor, and the searches would prune to the wrong model."""
    from types import SimpleNamespace

    from squeeze.methods.prune import PruneOptions
    from squeeze.prune.search import _resource
    from squeeze.recipe import Budget

    ref = load_model("zoo:digits-cnn")
    at4 = Protocol.for_target(HOST, repeat=5, warmup=2, min_repeat_ms=2, batch_size=4)
    ctx = SimpleNamespace(budget=Budget(latency_ratio=0.5), target=HOST, protocol=at4)
    opts = PruneOptions(latency_source="table+recalibrate")
    resource, recalibrate, source = _resource(ctx, ref, opts)
    assert source == "table+recalibrate" and resource.oracle.table.protocol.batch_size == 4
    # Entries at batch 4 are their own (the protocol is part of the table's scope), never batch-1 readings.
    assert LatencyTable(HOST, batch_size=4).scope != LatencyTable(HOST).scope


# --- in-context entries (squeeze.measure.incontext) ------------------------------------------------------


def _tiny_mobilenet():
    import testnets
    from squeeze.model.loading import LoadedModel

    return LoadedModel("tiny_mobilenet", "factory", (1, 3, 32, 32), testnets.tiny_mobilenet())


DEPTHWISE = ("1.1.0", "2.1.0")  # tiny_mobilenet's depthwise convs


def test_profile_maps_every_layer_of_a_depthwise_net_and_of_a_preactivation_net():
    """ORT profile events reach every table layer: NCHWc convs whose weights ORT re-laid out (found by biases of
    their own: the export shares the equal zero biases of BNs folded at init), and unfolded BNs."""
    import onnx

    from squeeze.export.onnx import export_onnx
    from squeeze.measure.incontext import _profile
    from squeeze.measure.profile import distinct_initializers
    from squeeze.model.loading import LoadedModel
    from squeeze.quant.ptq import LAYER_OPS

    table = LatencyTable(HOST, FAST)
    preact = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 4, 1)).eval()
    for model in (_tiny_mobilenet(), LoadedModel("preact", "factory", (1, 3, 10, 10), preact)):
        graph = distinct_initializers(onnx.load(str(export_onnx(model, exporter="torchscript").path))).graph
        inits = {i.name for i in graph.initializer}
        read = [i for n in graph.node if n.op_type in LAYER_OPS for i in n.input if i in inits]
        assert len(read) == len(set(read))  # no initializer shared between layers
        profile = _profile(model, table, runs=3)
        assert set(profile.layer_runs_us) == set(layer_configs(model.module, model.example_input()))
        assert all(len(v) == 3 for v in profile.layer_runs_us.values())


def test_relaid_out_kernels_pair_with_their_layers_by_scope_in_any_node_order():
    from squeeze.measure.profile import _pair_by_scope

    nodes = ["/stage3/stage3.0/branch2/branch2.2/branch2.2.2/Relu_output_0_nchwc",  # a conv fused up to its ReLU
             "/stage3/stage3.0/branch1/branch1.1/branch1.1.2/Relu_output_0_nchwc"]
    layers = ["stage3.0.branch1.1.0", "stage3.0.branch2.2.0"]
    expected = {nodes[0]: "stage3.0.branch2.2.0", nodes[1]: "stage3.0.branch1.1.0"}
    assert _pair_by_scope(nodes, layers) == _pair_by_scope(nodes[::-1], layers) == expected
    assert _pair_by_scope(["/a/Conv_0", "/b/Conv_1"], ["x", "y"]) == {"/a/Conv_0": "x", "/b/Conv_1": "y"}  # in order
    # DenseNet's layers sit in a ModuleList, which writes no scope; ORT runs its batch norms as blocked convs
    dense = [f"/features/features.4/layers.{i}/layers.{i}.{j}/layers.{i}.{j}.{k}/{op}_output_0{suffix}"
             for i in range(3)
             for j, k, op, suffix in ((0, 0, "BatchNormalization", "_bn_nchwc"), (1, 2, "Conv", "_nchwc"))]
    layers = [f"features.4.layers.{i}.{j}.{k}" for i in range(3) for j, k in ((1, 2), (0, 0))]
    expected = {n: "features.4." + n.split("/")[-2] for n in dense}
    assert _pair_by_scope(dense, layers) == _pair_by_scope(dense[::-1], layers) == expected


def test_in_context_entries_are_stored_apart_and_labelled():
    from squeeze.measure.incontext import WHOLE_KEY, InContext, context_key
    from squeeze.measure.profile import PAIRING

    model, table = _tiny_mobilenet(), LatencyTable(HOST, FAST)
    configs = layer_configs(model.module, model.example_input())
    ctx = InContext(table, model, configs)
    assert ctx.uncovered == [] and f"/in-context/v{PAIRING}/" in ctx.scope  # another pairing's times are not read
    keys = [context_key(n, c) for n, c in configs.items()]
    assert table.stored(keys) == {}  # not among the standalone entries
    stored = table.stored(keys, ctx.scope)
    assert set(stored) == set(keys) and {e.source for e in stored.values()} == {"in-context"}
    assert {e["source"] for e in ctx.to_json()} == {"in-context"}
    table.entries(list(configs.values()))
    assert {e["source"] for e in table.to_json([c.key for c in configs.values()])} == {"standalone"}
    # the layers' shares of the profile add up to the whole model (every node here is charged to a layer)
    assert sum(e.median_ms for e in stored.values()) == pytest.approx(ctx.reference_ms, rel=0.05)
    assert table.stored([WHOLE_KEY], ctx.scope)[WHOLE_KEY].median_ms == ctx.reference_ms
    again = InContext(table, model, configs)  # a second oracle on the same reference reuses them
    assert again.reference_ms == ctx.reference_ms and again.price([configs]) == ctx.price([configs])


def test_a_priced_model_uses_in_context_figures_then_scales_them_to_unprofiled_widths(quiet):
    from squeeze.measure.incontext import context_key
    from squeeze.measure.oracle import FixedOracle
    from squeeze.prune.tables import _pruned

    model = _tiny_mobilenet()
    oracle = TableOracle(LatencyTable(HOST, FAST), model, FixedOracle(1.0))
    ctx = oracle.context
    p = oracle.predict(model)
    assert set(p.sources.values()) == {"in-context"} and p.total_ms == pytest.approx(1.0)
    configs = layer_configs(model.module, model.example_input())
    alone = oracle.table.entries(list(configs.values()))
    for name in DEPTHWISE:
        figure = ctx._entries[context_key(name, configs[name])].median_ms
        assert p.per_layer_ms[name] == figure != alone[configs[name].key].median_ms

    pruned = _pruned(model, {"1.0.0": 16})  # block 1's expansion (and its depthwise conv) at half width
    q = oracle.predict(pruned)
    assert q.sources["1.1.0"] == q.sources["1.2.0"] == "scaled" and q.sources["2.1.0"] == "in-context"
    # a depthwise conv by its work, the 1x1 projection by its two widths timed side by side
    assert q.per_layer_ms["1.1.0"] == pytest.approx(p.per_layer_ms["1.1.0"] * 16 / 32)
    cfg = layer_configs(pruned.module, pruned.example_input())["1.2.0"]
    ratio = oracle.table.ratios([(configs["1.2.0"], cfg)])[(configs["1.2.0"].key, cfg.key)]
    assert q.per_layer_ms["1.2.0"] == pytest.approx(p.per_layer_ms["1.2.0"] * ratio)
    # not from the standalone entries, which come from runs at other moments
    oracle.table.store([LutEntry(cfg.key, 5, 9.0, 0.0, 9.0)])
    assert oracle.predict(pruned).per_layer_ms["1.2.0"] == q.per_layer_ms["1.2.0"]

    oracle.measured = FixedOracle(0.8)  # recalibrating measures the pruned model, and profiles it
    oracle.recalibrate(pruned)
    r = oracle.predict(pruned)
    assert set(r.sources.values()) == {"in-context"}
    assert r.layers_ms == pytest.approx(0.8 * oracle.reference_layers_ms, rel=0.05)
    assert r.total_ms == pytest.approx(0.8, rel=1e-6)  # the fit reproduces the measurement


def test_the_profiler_s_own_time_per_node_is_measured_and_taken_off_each_node():
    from squeeze.export.onnx import export_onnx
    from squeeze.measure.profile import profile_artifacts, profiler_overhead_us

    overhead = profiler_overhead_us(tuple(HOST.providers), FAST.threads)
    # a Reshape's kernel time in a profile less its time in a plain run: a few us here, but a loaded machine
    # may slow the plain run as much, and then nothing is taken off
    assert 0 <= overhead < 1000
    artifact = export_onnx(_tiny_mobilenet(), exporter="torchscript")
    plain, = profile_artifacts([artifact], HOST.providers, FAST, runs=3)
    gone, = profile_artifacts([artifact], HOST.providers, FAST, runs=3, node_overhead_us=1e9)
    assert plain.total_us > 0 and set(gone.layer_us) == set(plain.layer_us)
    assert gone.total_us == 0  # no node's time goes below nothing


def test_a_lone_model_is_profiled_with_spinning_workers_and_interleaved_ones_without(monkeypatch):
    """Without spinning, each multi-threaded kernel pays its workers' wake-up (a pruned MobileNetV2 profiled 0.57x
    its original, and measured 0.43x); interleaved, spinning workers of one session take the next one's cores."""
    from squeeze.export.onnx import export_onnx
    from squeeze.measure import profile

    configs, opened = [], profile.open_session

    def spy(artifact, providers, config=None, **options):
        configs.append(config)
        return opened(artifact, providers, config=config, **options)

    monkeypatch.setattr(profile, "open_session", spy)
    artifact = export_onnx(_tiny_mobilenet(), exporter="torchscript")
    profile.profile_artifacts([artifact], HOST.providers, FAST, runs=2)
    profile.profile_artifacts([artifact, artifact], HOST.providers, FAST, runs=2)
    assert configs == [None, profile.NO_SPINNING, profile.NO_SPINNING]


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(y)) + y)


def test_layer_consumers_follow_a_tensor_through_adds_and_activations():
    import onnx

    from squeeze.export.onnx import export_onnx
    from squeeze.measure.profile import layer_consumers
    from squeeze.model.loading import LoadedModel

    model = LoadedModel("residual", "factory", (1, 3, 12, 12), _Residual().eval())
    readers = layer_consumers(onnx.load(str(export_onnx(model, exporter="torchscript").path)))
    assert readers == {"a": {"b", "c"}, "b": {"c"}}


def test_a_layer_is_scaled_from_a_width_the_runtime_runs_the_same_way(quiet):
    """ORT runs a depthwise conv in its blocked layout only at a multiple of the block (8 on AVX2, 16 on
    AVX-512): a 48-wide one is priced from the profiled 64-wide one, not across the layout cliff from 58."""
    from squeeze.measure.incontext import layout
    from squeeze.measure.oracle import FixedOracle
    from squeeze.prune.tables import _pruned

    model = _tiny_mobilenet()
    oracle = TableOracle(LatencyTable(HOST, FAST), model, FixedOracle(1.0))
    at = {w: _pruned(model, {"2.0.0": w}) for w in (58, 48, 50, 62)}  # block 2's depthwise conv is 64 wide
    cfgs = {w: layer_configs(m.module, m.example_input())["2.1.0"] for w, m in at.items()}
    ref_cfg = layer_configs(model.module, model.example_input())["2.1.0"]
    ways = {w: layout(c, tuple(HOST.providers)) for w, c in (*cfgs.items(), (64, ref_cfg))}
    assert ways[64] == ways[48] != ways[58] == ways[50] == ways[62]
    assert any(domain == "com.microsoft.nchwc" for domain, _ in ways[64])
    ref_ms = oracle.predict(model).per_layer_ms["2.1.0"]
    oracle.measured = FixedOracle(1.0)
    oracle.recalibrate(at[58])  # now 58 is profiled too, and nearer to 48 than 64 is
    ms_58 = oracle.predict(at[58]).per_layer_ms
    assert oracle.predict(at[48]).per_layer_ms["2.1.0"] == pytest.approx(ref_ms * 48 / 64)
    assert oracle.predict(at[50]).per_layer_ms["2.1.0"] == pytest.approx(ms_58["2.1.0"] * 50 / 58)
    # The expansion feeding the depthwise conv runs one way at every width, but at 62 its reader does not run
    # as at 64, the nearer width: a reorder between them is charged to it, so it is priced from 58.
    at_62 = layer_configs(at[62].module, at[62].example_input())["2.0.0"]
    at_58 = layer_configs(at[58].module, at[58].example_input())["2.0.0"]
    assert oracle.predict(at[62]).per_layer_ms["2.0.0"] == pytest.approx(
        ms_58["2.0.0"] * oracle.table.ratios([(at_58, at_62)])[(at_58.key, at_62.key)])


def test_check_table_says_where_each_layer_figure_came_from():
    from squeeze.prune.tables import check_table

    result = check_table(_tiny_mobilenet(), LatencyTable(HOST, FAST), n_plans=2, seed=3)
    for row in result.rows:
        assert set(row.sources) == set(layer_configs(_tiny_mobilenet().module, torch.zeros(1, 3, 32, 32)))
        assert set(row.sources.values()) <= {"in-context", "scaled"}
    assert result.to_json()["rows"][1]["source_counts"] == result.rows[1].source_counts


def test_the_constant_fits_what_the_layers_miss_but_not_a_cliff():
    from squeeze.measure.lut import fit_table_constant

    # Layers say 0.5, the model measures 0.6: 2 ms of the reference's 10 do not scale with the layers.
    c = fit_table_constant(4.0, 8.0, 0.6)
    assert (4.0 + c) / (8.0 + c) == pytest.approx(0.6) and c == pytest.approx(2.0)
    # Layers say faster, the model measures slower than the reference (a grouped net at awkward widths): no
    # constant explains that, and one fitted to it would halve every other prediction. The current one stays.
    assert fit_table_constant(6.5, 8.0, 1.04, current_ms=0.3) == 0.3
    assert fit_table_constant(9.0, 8.0, 0.9, current_ms=0.0) == 0.0


def test_lut_check_names_plans_slower_than_the_original_and_plans_measured_on_a_contended_machine():
    from rich.console import Console

    from squeeze.prune.tables import CheckResult, CheckRow
    from squeeze.report.render import lut_check_view

    # Plan 1's run found the original at 8.0 ms against its fastest 6.5: the machine ran 1.23x slow.
    rows = [CheckRow(0, 200, 5.3, 6.7, 6.6), CheckRow(1, 300, 5.9, 5.8, 8.0, 5.9), CheckRow(2, 130, 4.0, 6.6, 6.5, 4.1)]
    result = CheckResult(rows, reference_ms=6.5, constant_ms=0.0, fastest_reference_ms=6.5)
    assert result.slower_plans == [0, 2] and result.to_json()["slower_plans"] == [0, 2]
    assert result.contended_plans == [1] and result.to_json()["rows"][1]["contention"] == pytest.approx(8.0 / 6.5)
    console = Console(width=200, record=True)
    console.print(lut_check_view(result, "regnet", "host-cpu"))
    text = " ".join(console.export_text().split())
    assert "2 of 3 plans (plan 0, 2) measured slower than the original" in text
    assert "--latency-source measured" in text
    assert "1 of 3 plans (plan 1) were measured while the machine ran over 1.2x slower" in text and "1.23x" in text
    assert "after recalibrating on plan 0" in text
    busy = CheckResult(rows, reference_ms=6.5, constant_ms=0.0, fastest_reference_ms=6.5, fitted_plans=[], fit_on=1)
    console = Console(width=200, record=True)
    console.print(lut_check_view(busy, "regnet", "host-cpu"))
    text = " ".join(console.export_text().split())
    assert "nothing recalibrated (plan 0 measured on a contended machine in every try, so not fitted on)" in text
    assert "(busy)" in text and busy.to_json()["recalibrated"] is False
    rows = [CheckRow(0, 200, 5.3, 6.7, 6.6), CheckRow(1, 300, 5.9, 5.8, 8.0), CheckRow(2, 130, 4.0, 6.6, 6.5),
            CheckRow(3, 130, 4.0, 6.6, 6.5, 4.1)]
    some = CheckResult(rows, reference_ms=6.5, constant_ms=0.0, fastest_reference_ms=6.5, fitted_plans=[0, 2],
                       fit_on=3)
    console = Console(width=200, record=True)
    console.print(lut_check_view(some, "regnet", "host-cpu"))
    text = " ".join(console.export_text().split())
    assert "after recalibrating on plans 0, 2 (plan 1 measured on a contended machine" in text
    assert text.count("(fit)") == 2 and text.count("(busy)") == 1 and some.to_json()["fitted_plans"] == [0, 2]


def test_lut_check_standalone_at_a_batch_times_table_and_plans_there():
    from squeeze import api

    loaded, table, result = api.lut_check("zoo:digits-cnn", HOST, api.ModelOptions(), plans=2, batch_size=2,
                                          in_context=False, fit_on=1)
    assert table.protocol.batch_size == 2 and table.scope != LatencyTable(HOST).scope
    assert all(set(r.sources.values()) == {"standalone"} for r in result.rows)
    assert len(result.rows) == 2 and all(r.measured_ms > 0 for r in result.rows)
