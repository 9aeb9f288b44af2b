"""AMC (prune.amc): the budget wall, the state, the least-squares reconstruction, priced policies, and whole
searches on digits-cnn (MACs through the registry's pass; latency on a deterministic table and machine) and on
MobileNetV1 at 224 (its published MACs, AMC's released 50%-FLOPs channels, a search at --macs 0.5x).

Latency here is a deterministic function of the layer shapes: the table prices each layer by its MACs, the
"machine" adds what a table misses (a fixed overhead), so a re-fit has something to correct.
"""

import math
import random

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from squeeze.data import DataBundle
from squeeze.errors import DataError
from squeeze.measure.lut import LutEntry, layer_configs
from squeeze.measure.oracle import LatencyOracle
from squeeze.methods import get_pass
from squeeze.methods.base import ModelState, PassContext
from squeeze.methods.prune.amc import (AMCEnv, AMCOptions, LayerFeatures, PolicyPricer, Step, amc, budget_wall,
                                       make_steps)
from squeeze.model.loading import LoadedModel, load_model
from squeeze.preprocessing import Preprocessing
from squeeze.prune import prunable_layers
from squeeze.prune.budget import Resource, resolve_budget
from squeeze.prune.search import pruned_candidate
from squeeze.recipe import Budget, ExportOptions
from squeeze.model.summary import summarize
from squeeze.target import load_target

HOST = load_target("host-cpu")


def quick(**overrides) -> AMCOptions:
    """A few episodes, a short fine-tune: what a test can afford."""
    base = {"episodes": 8, "warmup": 2, "proxy": {"eval_fraction": 0.55}, "feature_images": 128,
            "long_term": {"optimizer": "sgd", "lr": 0.01, "iterations": 5}}
    return AMCOptions(**(base | overrides))


# --- the budget wall and the state --------------------------------------------------------------------


def _toy_steps(n: int, seed: int) -> list[Step]:
    rng = random.Random(seed)
    steps = []
    for i in range(n):
        width = 8 * rng.randint(2, 16)
        grid = tuple(w for w in range(8, width + 1, 8) if w >= math.ceil(0.2 * width))
        steps.append(Step(f"g{i}", width, grid, (i, 0, 1, width, 1, 3, width)))
    return steps


def _toy_price(steps: list[Step], seed: int, jitter: float = 0.3):
    """A cost table: each layer costs its input times its output width plus a per-(layer, width) jitter that
    makes the cost not monotone in the width (as measured tables are not)."""
    rng = random.Random(seed)
    jitter = {(s.name, w): rng.uniform(-jitter, jitter) * w * w for s in steps for w in s.grid}

    def price(policies):
        out = []
        for p in policies:
            widths = [p.get(s.name, s.width) for s in steps]
            ins = [3, *widths[:-1]]
            out.append(sum(i * w + jitter[s.name, w] for s, i, w in zip(steps, ins, widths)))
        return out

    return price


@pytest.mark.parametrize("seed", range(5))
def test_the_budget_wall_never_exceeds_the_budget_on_a_toy_cost_table(seed):
    steps = _toy_steps(6, seed)
    price = _toy_price(steps, seed)
    full = price([{}])[0]
    floor = price([{s.name: s.grid[0] for s in steps}])[0]
    rng = random.Random(seed)
    for ratio in (0.3, 0.5, 0.8):
        target = max(ratio * full, floor)
        for _ in range(30):
            policy = {}
            for t, s in enumerate(steps):
                asked = s.asked(rng.random(), 0.2)
                width = budget_wall(steps, policy, t, asked, price, target)
                assert width in s.grid and width <= asked
                policy[s.name] = width
                # Feasible at every step: the later groups at their minimum meet the target.
                assert price([{**policy, **{x.name: x.grid[0] for x in steps[t + 1:]}}])[0] <= target
            assert price([policy])[0] <= target
        # Asking for everything: the wall cuts only as much as the budget needs, one grid step at most over.
        policy = {}
        for t, s in enumerate(steps):
            policy[s.name] = budget_wall(steps, policy, t, s.width, price, target)
        assert price([policy])[0] <= target


@pytest.mark.parametrize("seed", range(3))
def test_the_filled_wall_ends_every_episode_at_the_budget_where_the_one_sided_one_falls_short(seed):
    steps = _toy_steps(6, seed)
    price = _toy_price(steps, seed, jitter=0.0)
    target = 0.5 * price([{}])[0]
    rng = torch.Generator().manual_seed(seed)
    spent = {}
    for fill in (False, True):
        env = AMCEnv(steps, price, target, 0.2, lambda policy: (0.0, {}), fill)
        spent[fill] = []
        for _ in range(20):
            done, _ = False, env.reset()
            while not done:
                _, _, done, info = env.step(torch.rand(1, generator=rng))
            policy, last = info["widths"], steps[-1]
            assert info["predicted"] <= target
            spent[fill].append(info["predicted"] / target)
            if fill and policy[last.name] < last.width:
                # The last group one grid step wider would be over: nothing left to spend.
                wider = last.grid[last.grid.index(policy[last.name]) + 1]
                assert price([{**policy, last.name: wider}])[0] > target
    assert min(spent[True]) > max(0.9, sum(spent[False]) / len(spent[False])), spent


def test_the_state_is_normalised_and_tracks_the_episode(digits_model):
    table = prunable_layers(digits_model.module, digits_model.example_input())
    steps = make_steps(table, 0.2, 8)
    assert [s.name for s in steps] == ["conv1.0", "conv2.0", "conv3.0", "conv5.0"]  # the classifier stays
    price = PolicyPricer(digits_model, Resource("macs"), summarize(digits_model).macs)
    env = AMCEnv(steps, price, 0.5 * price([{}])[0], 0.2, lambda policy: (0.0, {}))
    assert env.states.shape == (4, 10)
    static = env.states[:, :7]
    varying = static.max(0).values > static.min(0).values
    assert (static.min(0).values[varying] == 0).all() and (static.max(0).values[varying] == 1).all()
    assert (static[:, ~varying] == 0).all()  # conv kernels are all 3x3: a column that tells nothing apart
    rng = torch.Generator().manual_seed(0)
    for _ in range(5):
        states, done, state = [], False, env.reset()
        while not done:
            states.append(state)
            state, _, done, info = env.step(torch.rand(1, generator=rng))
        x = torch.stack(states)
        assert ((x >= 0) & (x <= 1)).all(), x
        assert x[0, -3] == 0 and x[0, -1] == 1  # nothing saved yet, no previous action
        assert (x[1:, -3] >= x[:-1, -3]).all()  # saving only grows
        assert (x[1:, -2] <= x[:-1, -2]).all()  # less left to save
        # the previous ratio is the width the wall let the previous group keep
        assert [round(float(r), 4) for r in x[1:, -1]] == [
            round(info["widths"][s.name] / s.width, 4) for s in steps[:-1]]


# --- least-squares reconstruction ---------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [1, 3])
def test_reconstruction_lowers_the_next_layers_output_error(kernel):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 16, kernel, padding=kernel // 2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    model = LoadedModel("toy", "factory", (1, 3, 12, 12), module)
    table = prunable_layers(module, model.example_input())
    features = LayerFeatures(module, table, torch.randn(200, 3, 12, 12), points=10)
    assert set(features.samples) == {"3", "8"}  # the conv reading group "0" and the classifier reading "3"
    assert features.samples["3"].x.shape == (2000, 32, kernel * kernel)
    pruned, plan = pruned_candidate(model, None, {"0": 8}, "l1", 8)
    rebuilt, _ = pruned_candidate(model, None, {"0": 8}, "l1", 8)
    assert features.reconstruct(rebuilt.module, plan) == ["3"]

    def conv_out(m, x):  # the second conv's output, before its BatchNorm
        return m[:4](x)

    x = torch.randn(64, 3, 12, 12)  # not the samples the fit saw
    with torch.no_grad():
        want = conv_out(module, x)
        plain = (conv_out(pruned.module, x) - want).pow(2).mean()
        fitted = (conv_out(rebuilt.module, x) - want).pow(2).mean()
    assert fitted < 0.7 * plain, (fitted, plain)


def test_reconstruction_solves_the_least_squares_problem_on_its_samples():
    """On the sampled rows the re-fitted weights are the least-squares optimum: no weights of the kept
    channels do better, the unpruned weights restricted to them included."""
    torch.manual_seed(1)
    module = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1),
                           nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    model = LoadedModel("toy", "factory", (1, 3, 8, 8), module)
    features = LayerFeatures(module, prunable_layers(module, model.example_input()), torch.randn(100, 3, 8, 8), 8)
    pruned, plan = pruned_candidate(model, None, {"0": 8}, "l1", 8)
    s, kept = features.samples["2"], torch.tensor(plan.kept_indices["0"])
    x, y = s.x[:, kept].reshape(len(s.x), -1), s.y

    def error(weight):
        return (x @ weight.reshape(8, -1).T - y).pow(2).mean()

    before = error(pruned.module[2].weight.detach())
    features.reconstruct(pruned.module, plan)
    after = error(pruned.module[2].weight.detach())
    assert after < before
    nudged = pruned.module[2].weight.detach() + 1e-2 * torch.randn_like(pruned.module[2].weight)
    assert after <= error(nudged)


# --- priced policies ----------------------------------------------------------------------------------


def _cost_ms(config) -> float:
    """A deterministic layer latency: its multiply-accumulates at 1 GMAC/s, plus 1 us per call."""
    k = config.kernel[0] * config.kernel[1]
    return config.c_in // config.groups * config.c_out * k * config.h * config.w * 1e-6 + 1e-3


class FakeTable:
    """A LatencyTable without measurement: every entry is `_cost_ms` of its layer."""

    def __init__(self, target, batch_size: int = 1):
        self.target = target

    def entries(self, configs):
        return {c.key: LutEntry(c.key, 1, _cost_ms(c), 0.0, _cost_ms(c)) for c in configs}

    def layers_ms(self, module, example_input):
        return {n: _cost_ms(c) for n, c in layer_configs(module, example_input).items()}


class FakeMachine(LatencyOracle):
    """Whole-model readings: the table's layers 10% slower, plus an overhead the table does not see; no one
    constant makes the table right for every model, so each re-fit moves it."""

    def __init__(self, reference=None, target=HOST, protocol=None):
        self.target, self.readings = target, []
        self.reference_ms = None if reference is None else self.latency_ms(reference)

    def latency_ms(self, model):
        ms = 1.1 * sum(FakeTable(HOST).layers_ms(model.module, model.example_input()).values()) + 0.05
        self.readings.append(ms)
        return ms


def test_a_priced_policy_equals_the_table_sum_of_the_model_pruned_to_it(digits_model):
    from squeeze.measure.lut import TableOracle

    table = TableOracle(FakeTable(HOST), digits_model, FakeMachine())
    latency = PolicyPricer(digits_model, Resource("latency_ms", table, FakeMachine()), 0)
    macs = PolicyPricer(digits_model, Resource("macs"), summarize(digits_model).macs)
    steps = make_steps(prunable_layers(digits_model.module, digits_model.example_input()), 0.2, 8)
    full = {s.name: s.width for s in steps}
    rng = random.Random(0)
    for _ in range(6):
        policy = {s.name: rng.choice(s.grid) for s in steps}
        pruned, _ = pruned_candidate(digits_model, None, {n: w for n, w in policy.items() if w < full[n]}, "l1", 8)
        assert latency([policy])[0] == pytest.approx(table.latency_ms(pruned), rel=1e-12)
        assert macs([policy])[0] == summarize(pruned).macs


# --- whole searches -----------------------------------------------------------------------------------


def _ctx(budget: Budget, data) -> PassContext:
    from squeeze.measure.oracle import MeasuredOracle
    from squeeze.measure.protocol import Protocol

    protocol = Protocol.for_target(HOST, repeat=5, warmup=2, min_repeat_ms=2, threads=1)
    return PassContext(HOST, MeasuredOracle(HOST, protocol), protocol, ExportOptions(), budget, data=data)


@pytest.fixture(scope="module")
def macs_search(digits_model, digits_data):
    cls = get_pass("prune.amc")
    state, record = cls(quick()).run(ModelState(digits_model), _ctx(Budget(macs_ratio=0.5), digits_data))
    return state, record


def test_amc_through_the_registry_meets_a_macs_budget(macs_search, digits_model):
    state, record = macs_search
    budget = record["budget"]
    assert record["search"] == "amc" and budget["resource"] == "macs"
    assert record["final_measured"] == summarize(state.model).macs <= budget["target"]
    assert record["budget_met"] is True
    # One history entry per episode, each policy priced under the budget by the wall.
    assert len(record["history"]) == len(record["reward_curve"]) == 8
    assert all(h["resource"] <= budget["target"] for h in record["history"])
    assert record["reward_curve"] == pytest.approx([h["proposals"][0]["reward"] for h in record["history"]], abs=1e-6)
    # The chosen policy: of the highest rewards on the subset, the best on the whole validation split.
    chosen = next(s for s in record["selection"] if s["chosen"])
    rescored = record["rescored"]
    assert len(rescored) == min(8, len({tuple(h["proposals"][0]["widths"].values()) for h in record["history"]}))
    assert [r["rescored"] for r in rescored] == sorted((r["rescored"] for r in rescored), reverse=True)
    assert chosen["episode"] == rescored[0]["episode"] and chosen["rescored"] == rescored[0]["rescored"]
    assert record["final_predicted"] == chosen["predicted"] == chosen["confirmed"] == record["final_measured"]
    assert {n: round(w / before, 4) for n, (before, w) in record["widths"].items() if n in record["ratios"]} \
        == record["ratios"]
    assert all(0.2 <= r <= 1 for r in record["ratios"].values())
    assert record["plan"] == state.model.plans[-1]


def test_amc_is_the_same_for_the_same_seed(digits_model, digits_data):
    opts = quick(episodes=6)
    budget = resolve_budget(Budget(macs_ratio=0.5), digits_model, Resource("macs"))
    runs = [amc(digits_model, budget, Resource("macs"), o, digits_data) for o in (opts, opts, quick(episodes=6, seed=1))]
    (a, b, c) = [([h.proposals[0]["asked"] for h in r.history], r.extra["ratios"]) for r in runs]
    assert a == b
    assert c[0] != a[0]  # another seed explores otherwise


def test_the_accuracy_guaranteed_reward_is_minus_error_times_log_macs(digits_model, digits_data):
    budget = resolve_budget(Budget(macs_ratio=0.5), digits_model, Resource("macs"))
    result = amc(digits_model, budget, Resource("macs"), quick(episodes=3, reward="error_log_flops"), digits_data)
    for h in result.history:
        assert h.proposals[0]["reward"] == pytest.approx(-(1 - h.accuracy) * math.log(h.resource))


def test_amc_needs_data_before_anything_is_measured(digits_model, cli, tmp_path):
    with pytest.raises(DataError, match=r"AMC needs data \(--data\)"):
        get_pass("prune.amc")(quick()).run(ModelState(digits_model), _ctx(Budget(latency_ratio=0.5), None))
    result = cli("prune", "zoo:digits-cnn", "--method", "amc", "--macs", "0.5x", "--out", tmp_path / "out")
    assert result.exit_code == 2 and "AMC needs data (--data)" in result.output
    assert not (tmp_path / "out").exists()


def test_amc_under_a_latency_budget_prices_from_the_table_and_refits_it(digits_model, digits_data, monkeypatch):
    import squeeze.prune.search as search

    from squeeze.measure.lut import TableOracle

    machines = []
    monkeypatch.setattr(search, "RelativeOracle", lambda *a: machines.append(FakeMachine(*a)) or machines[-1])
    monkeypatch.setattr(search, "TableOracle", lambda _table, ref, measured: TableOracle(FakeTable(HOST), ref, measured))
    monkeypatch.setattr(search, "LatencyTable", FakeTable)
    opts = quick(episodes=8, recalibrate_every=3)
    state, record = get_pass("prune.amc")(opts).run(ModelState(digits_model), _ctx(Budget(latency_ratio=0.6), digits_data))
    assert record["latency_source"] == "table+recalibrate"
    target = record["budget"]["target"]
    assert [r["episode"] for r in record["recalibrations"]] == [2, 5]
    # The table misses the machine's overhead: a re-fit moves the prediction of the measured policy onto its
    # reading, which is then what the table says.
    assert all(r["refitted"] == pytest.approx(r["measured"], rel=1e-9) for r in record["recalibrations"])
    assert record["recalibrations"][0]["predicted"] != record["recalibrations"][0]["measured"]
    chosen = next(s for s in record["selection"] if s["chosen"])
    assert chosen["predicted"] <= target and chosen["confirmed"] <= 1.02 * target
    truth = FakeMachine().latency_ms(state.model)
    assert record["final_measured"] == pytest.approx(truth)
    assert record["final_predicted"] == record["history"][chosen["episode"]]["resource"] <= target
    assert record["budget_met"] is (truth <= 1.02 * target)


# --- MobileNetV1 ----------------------------------------------------------------------------------------

# AMC's released MobileNetV1 at 50% FLOPs: input channels of each non-depthwise layer (stem conv .. classifier).
AMC_CHANNELS = [3, 24, 48, 96, 80, 192, 200, 328, 352, 368, 360, 328, 400, 736, 752]


@pytest.fixture(scope="module")
def mobilenet():
    return load_model("zoo:mobilenet_v1")


def test_mobilenet_v1_has_the_papers_size(mobilenet):
    s = summarize(mobilenet)
    assert s.macs == pytest.approx(568.7e6, rel=1e-3)
    weights = sum(m.weight.numel() for m in mobilenet.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert weights + 1000 == pytest.approx(4.21e6, rel=2e-3)  # conv and fc weights + fc bias (BN not counted)


def test_amcs_released_half_flops_mobilenet_v1_counts_293_9m_macs(mobilenet):
    table = prunable_layers(mobilenet.module, mobilenet.example_input())
    roots = table.names()
    assert len(roots) == len(AMC_CHANNELS) - 1  # the stem's input (3) is the image
    pruned, _ = pruned_candidate(mobilenet, None, dict(zip(roots, AMC_CHANNELS[1:])), "l1", 8)
    assert summarize(pruned).macs == pytest.approx(293.9e6, rel=5e-3)
    inputs = [m.in_channels if isinstance(m, nn.Conv2d) else m.in_features for m in pruned.module.modules()
              if isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.groups == 1]
    assert inputs == AMC_CHANNELS


def _random_images(n: int, shape, classes: int) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn((n, *shape[1:]), generator=g), torch.randint(0, classes, (n,), generator=g)
    split = TensorDataset(images, labels)
    return DataBundle("random", split, split, None, classes, tuple(shape), Preprocessing())


def test_an_amc_search_on_mobilenet_v1_lands_at_half_the_macs(mobilenet):
    resource = Resource("macs")
    budget = resolve_budget(Budget(macs_ratio=0.5), mobilenet, resource)
    # An agent that asks for every channel: the wall alone sets the widths, within a grid step of the budget.
    steps = make_steps(prunable_layers(mobilenet.module, mobilenet.example_input()), 0.2, 8)
    env = AMCEnv(steps, PolicyPricer(mobilenet, resource, budget.original), budget.target, 0.2,
                 lambda policy: (0.0, {}))
    env.reset()
    for _ in steps:
        *_, info = env.step(torch.ones(1))
    walled, _ = pruned_candidate(mobilenet, None, info["widths"], "l1", 8)
    assert 0.97 * budget.target <= summarize(walled).macs <= budget.target
    # A whole search (random episodes, no reconstruction, a tiny reward set): never above the budget.
    opts = AMCOptions(episodes=2, warmup=0, proxy={"eval_fraction": 0.004}, reconstruct=False)
    result = amc(mobilenet, budget, resource, opts, _random_images(4, mobilenet.input_shape, 1000))
    assert summarize(result.model).macs <= budget.target
    assert [h.resource for h in result.history] and all(h.resource <= budget.target for h in result.history)


def test_amc_reward_set_is_the_proxy_and_the_record_says_which(macs_search):
    _, record = macs_search
    assert record["proxy"]["eval_fraction"] == 0.55 and record["proxy"]["label"] == "eval 55%"
    # AMC has no per-episode fine-tune to cut, and its hierarchical step is rescore_top.
    for bad in ({"iterations_fraction": 0.5}, {"promote": 2}):
        with pytest.raises(ValueError, match="AMC scores policies without a fine-tune"):
            AMCOptions(proxy=bad)


def test_the_fidelity_reward_is_zero_for_the_unpruned_policy_and_falls_as_channels_go(digits_model, digits_data):
    from squeeze.methods.prune.amc import _Policies

    table = prunable_layers(digits_model.module, digits_model.example_input())
    pricer = PolicyPricer(digits_model, Resource("macs"), summarize(digits_model).macs)
    policies = _Policies(digits_model, table, digits_data, AMCOptions(reward="fidelity", feature_images=64), pricer)
    full = table.widths()

    def cut(share: float) -> dict[str, int]:
        return {name: max(8, int(share * w) // 8 * 8) for name, w in full.items()}

    rewards = [policies.score(p)[0] for p in (full, cut(0.75), cut(0.25))]
    assert rewards[0] == 0.0 and rewards[0] > rewards[1] > rewards[2]


def test_selection_measures_what_the_table_overprices_by_no_more_than_it_has_been_seen_to():
    from types import SimpleNamespace as NS

    from squeeze.methods.prune.amc import _select

    # widths of one group -> (reward, table price, measured latency); the budget is 1.0 ms.
    policies_seen = {24: (0.9, 1.3, 0.9), 16: (0.8, 0.95, 0.95), 12: (0.85, 1.2, 1.4)}
    floor = {8: (None, 0.5, 0.6)}
    known = policies_seen | floor
    records = [NS(episode=i, reward=r, info={"widths": {"g": w}, "predicted": p})
               for i, (w, (r, p, _)) in enumerate(policies_seen.items())]
    env = NS(price=lambda ws: [known[ws[0]["g"]][1]], steps=[NS(name="g", grid=(8, 16, 24))])
    policies = NS(build=lambda w: w["g"], full_reward=lambda m, w: known[m][0])
    budget, pricer = NS(resource="latency_ms", target=1.0), NS(forget=lambda: None)
    args = (records, env, policies, budget, lambda m: known[m][2], pricer, 0)
    # The table as priced: 24 channels look over the budget, 16 is taken.
    _, tried, _ = _select(*args)
    assert [(t["widths"]["g"], t["chosen"]) for t in tried] == [(16, True)]
    # The table has over-priced a policy by 1.4x: 24 channels (priced 1.3) is measured, reads 0.9, and is taken.
    _, tried, _ = _select(*args, slack=1.4)
    assert [(t["widths"]["g"], t["chosen"]) for t in tried] == [(24, True)]
    # Every policy tried reads over: the smallest allowed one is measured too, and taken where it reads under.
    known[16] = (0.8, 0.95, 1.2)
    _, tried, _ = _select(*args)
    assert [(t["widths"]["g"], t["chosen"]) for t in tried] == [(16, False), (8, True)]
