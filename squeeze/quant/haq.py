"""HAQ (Wang et al., CVPR 2019; code mit-han-lab/haq): per-layer precision chosen by a DDPG agent with
hardware feedback.

One episode walks the quantizable layers (Conv2d, Linear) in forward order. Per layer the agent sees a
normalized state (index, depthwise?, fc?, c_in, c_out, stride, kernel, weight count, input area, previous
action) and answers a in [0, 1]; a picks one of the layer's precisions ordered by weight bits, as HAQ's
`round(a (b_max - b_min + 1) + b_min - 0.5)` does over consecutive bit widths (`action_to_index`). After the
last layer the budget wall walks from the last layer back, one step lower per layer and sweep, until the
policy's cost fits the budget (`budget_wall`). The policy is then fine-tuned briefly with fake quantization
in torch and evaluated on the validation split; reward = 0.1 x (accuracy - fp32 accuracy) in percentage
points, credited to every step of the episode (squeeze.agents.ddpg).

What a layer may choose depends on the budget:
- latency: only precisions the target's runtime executes, each measured per layer (squeeze.quant.costs):
  fp32, fp16 where it runs, int8 (QDQ), int4w (4-bit weight-only MatMulNBits, Linear). A precision that
  is not faster than a wider one for that layer is dropped (it would cost accuracy for nothing), so
  lowering bits always lowers the cost and the wall is monotone. The policy's latency is predicted from
  the table as a ratio to the measured fp32 model, with a constant for what the layers miss (pooling,
  adds, per-call overhead) fitted to the measured uniform-int8 model; the final policy is measured.
- size: also 2..7-bit weights for convolutions (no kernel anywhere: exported as int8 QDQ whose weights
  lie on the b-bit grid, i.e. *simulated*, and their latency is modelled). Size is counted exactly:
  weight params x bits / 8 (+ biases in 32 bits, other parameters in fp32).
First and last layers never go below 8 bits (HAQ pins them at 8 for accuracy).

Why the reward comes from torch fake quantization and not from each policy's ORT export: the per-episode
fine-tune has to run in torch anyway, the fake-quant forward uses ORT's own rules (per-channel symmetric
int8 weights with range max|w| / 127, asymmetric uint8 activations over the calibrated min/max including
0, MatMulNBits' block-wise 4-bit rounding), and it costs no export, quantization or ORT session per
episode. The final policy is exported through `quantize_onnx` and evaluated through ORT; the report gives
both accuracies, so their agreement is visible.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.errors import DataError
from squeeze.measure.lut import LayerConfig, fit_table_constant, layer_configs
from squeeze.measure.oracle import LatencyOracle, MeasuredOracle
from squeeze.prune.budget import BudgetError, Resource, ResolvedBudget, resolve_budget
from squeeze.quant.costs import CostRow, CostTable, Precision, layer_size_bytes, precision
from squeeze.quant.fakequant import fake_int4_weight, fake_quant_weight, int8_reduce_range, round_ste, weight_levels
from squeeze.quant.mixed import INT4_BLOCK

if TYPE_CHECKING:
    from squeeze.data import DataBundle
    from squeeze.export.artifact import OnnxArtifact
    from squeeze.measure.protocol import Protocol
    from squeeze.model import LoadedModel
    from squeeze.methods.haq import HAQOptions
    from squeeze.recipe import Budget
    from squeeze.target import Target

__all__ = ["action_to_index", "budget_wall", "HAQLayer", "HAQEnv", "fake_quant_model", "strip_fake_quant",
           "input_ranges", "export_policy", "HAQSetup", "prepare", "search", "finish", "haq_search", "HAQResult",
           "cost_of", "names_of"]

log = logging.getLogger("squeeze.quant.haq")

REWARD_SCALE = 0.1  # HAQ: reward = 0.1 x (acc - acc_fp32), accuracies in percent


# ---------------------------------------------------------------------------------------------------
# Actions, the budget wall.


def action_to_index(action: float, n: int) -> int:
    """a in [0, 1] -> one of n ordered choices, in equal-width bins: HAQ's bits = round(a (b_max - b_min + 1)
    + b_min - 0.5) over n = b_max - b_min + 1 consecutive widths, except that a = 1 is the last choice (numpy's
    half-to-even rounding of b_max + 0.5 overshoots when b_max is odd)."""
    return min(n - 1, max(0, math.floor(float(action) * n)))


def budget_wall(policy: list[int], costs: list[list[float]], floors: list[int], target: float) -> list[int]:
    """HAQ's final action wall: while the policy costs more than `target` and can still go lower, sweep from
    the last layer to the first, lowering each layer one choice (not below its floor) and stopping as soon
    as the policy fits. `costs[i][j]` is layer i's cost in choice j, increasing in j."""
    policy = list(policy)

    def cost() -> float:
        return sum(c[j] for c, j in zip(costs, policy))

    while cost() > target and any(j > f for j, f in zip(policy, floors)):
        for i in reversed(range(len(policy))):
            if policy[i] > floors[i]:
                policy[i] -= 1
            if cost() <= target:
                break
    return policy


# ---------------------------------------------------------------------------------------------------
# Layers, their choices and states.


@dataclass
class HAQLayer:
    name: str  # torch module name
    config: LayerConfig
    choices: list[Precision]  # ascending weight bits
    costs: list[float]  # per choice: latency in the table's time base (ms) or size (bytes)
    measured: list[bool]
    floor: int = 0  # lowest choice allowed (first/last layers: 8 bits)

    @property
    def depthwise(self) -> bool:
        return self.config.op == "conv2d" and self.config.groups == self.config.c_in and self.config.c_in > 1


def _state_features(layers: list[HAQLayer]) -> torch.Tensor:
    """(n_layers, 10): static features, min-max normalized per column (constant columns kept as they are,
    as the reference does); the last column is the previous action, filled in during the episode."""
    rows = []
    for i, layer in enumerate(layers):
        c = layer.config
        k = c.kernel[0] * c.kernel[1] if c.op == "conv2d" else 1
        weights = c.c_out * (c.c_in // c.groups) * k
        rows.append([i, float(layer.depthwise), float(c.op == "linear"), c.c_in, c.c_out, c.stride[0], c.kernel[0],
                     weights, c.h * c.w, 1.0])
    x = torch.tensor(rows, dtype=torch.float32)
    lo, hi = x.min(0).values, x.max(0).values
    span = hi - lo
    varying = span > 0
    x[:, varying] = (x[:, varying] - lo[varying]) / span[varying]
    return x


class HAQEnv:
    """The DDPG environment: one step per layer; `evaluate(policy) -> accuracy %` after the wall."""

    def __init__(self, layers: list[HAQLayer], target_cost: float, evaluate: Callable[[tuple[str, ...]], float],
                 base_accuracy: float) -> None:
        self.layers, self.target_cost, self.evaluate, self.base_accuracy = layers, target_cost, evaluate, base_accuracy
        self.states = _state_features(layers)
        self.policy: list[int] = []

    def reset(self) -> torch.Tensor:
        self.policy = []
        return self.states[0].clone()

    def step(self, action: torch.Tensor) -> tuple[torch.Tensor, float, bool, dict[str, Any]]:
        i = len(self.policy)
        layer = self.layers[i]
        j = max(layer.floor, action_to_index(float(action[0]), len(layer.choices)))
        self.policy.append(j)
        if i + 1 < len(self.layers):
            state = self.states[i + 1].clone()
            state[-1] = j / max(1, len(layer.choices) - 1)
            return state, 0.0, False, {}
        asked = list(self.policy)
        self.policy = budget_wall(self.policy, [lay.costs for lay in self.layers], [lay.floor for lay in self.layers],
                                  self.target_cost)
        names = names_of(self.layers, self.policy)
        accuracy = self.evaluate(names)
        reward = REWARD_SCALE * (accuracy - self.base_accuracy)
        info = {"policy": list(names), "asked": list(names_of(self.layers, asked)),
                "cost": cost_of(self.layers, self.policy), "accuracy": accuracy}
        return self.states[i].clone(), reward, True, info


# ---------------------------------------------------------------------------------------------------
# Fake quantization in torch, as ONNX Runtime quantizes.


def _fake_weight(w: torch.Tensor, p: Precision) -> torch.Tensor:
    """The weight on precision `p`'s grid: MatMulNBits blocks for int4w, else symmetric per output channel
    (int8 as ORT, 7-bit where the CPU has no int8 dot product)."""
    if p.name == "int4w":
        return fake_int4_weight(w, INT4_BLOCK)
    return fake_quant_weight(w, weight_levels(p.weight_bits, p.weight_bits == 8 and int8_reduce_range()))


class _QuantLayer(nn.Module):
    """A Conv2d/Linear whose weight (and, for 8-bit activations, input) is fake-quantized; `layer` keeps the
    trainable float weights, so the straight-through estimator fine-tunes them in place."""

    def __init__(self, layer: nn.Module, precision: Precision, input_range: tuple[float, float]) -> None:
        super().__init__()
        self.layer, self.precision = layer, precision
        lo, hi = min(input_range[0], 0.0), max(input_range[1], 0.0)  # ORT keeps 0 representable
        self.scale = max(hi - lo, 1e-8) / 255
        self.zero_point = min(255, max(0, round(-lo / self.scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision.act_bits == 8:
            q = torch.clamp(round_ste(x / self.scale) + self.zero_point, 0, 255)
            x = (q - self.zero_point) * self.scale
        w = _fake_weight(self.layer.weight, self.precision)
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, w, self.layer.bias)
        m = self.layer
        return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)


def input_ranges(module: nn.Module, names: list[str], samples: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(min, max) of each named layer's input over the calibration samples (ORT's minmax calibration)."""
    ranges: dict[str, list[float]] = {}

    def hook(name):
        def fn(_m, inputs, _out):
            x = inputs[0].detach()
            lo, hi = ranges.get(name, [math.inf, -math.inf])
            ranges[name] = [min(lo, float(x.min())), max(hi, float(x.max()))]
        return fn

    mods = dict(module.named_modules())
    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            module.eval()
            for start in range(0, len(samples), 64):
                module(samples[start:start + 64])
    finally:
        for h in handles:
            h.remove()
    return {n: (lo, hi) for n, (lo, hi) in ranges.items()}


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def fake_quant_model(module: nn.Module, policy: dict[str, Precision], ranges: dict[str, tuple[float, float]]
                     ) -> nn.Module:
    """A copy of `module` with each layer of `policy` fake-quantized (fp32 / fp16 layers stay float)."""
    model = copy.deepcopy(module)
    for name, p in policy.items():
        if p.weight_bits < 16:
            _set_module(model, name, _QuantLayer(model.get_submodule(name), p, ranges[name]))
    return model


def strip_fake_quant(model: nn.Module, round_weights: set[str] = frozenset()) -> nn.Module:
    """The float model back from `fake_quant_model`, keeping the fine-tuned weights; layers named in
    `round_weights` get their weights replaced by the fake-quantized values (simulated bit widths)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, _QuantLayer):
            if name in round_weights:
                with torch.no_grad():
                    m.layer.weight.copy_(_fake_weight(m.layer.weight, m.precision))
            _set_module(model, name, m.layer)
    return model


# ---------------------------------------------------------------------------------------------------
# Export of a policy.


def export_policy(model: LoadedModel, policy: dict[str, Precision], calibration, calibration_method: str
                  ) -> OnnxArtifact:
    """One ONNX model: int8 QDQ for int8 and simulated wNa8 layers (their weights already on the b-bit
    grid), float for fp32, 4-bit MatMulNBits for int4w."""
    from squeeze.export.onnx import export_onnx
    from squeeze.quant.mixed import int4_weights
    from squeeze.quant.ptq import QuantConfig, quantize_onnx

    artifact = export_onnx(model)
    per_layer = {name: "int8" if p.act_bits == 8 else "fp32" for name, p in policy.items()}
    if any(v == "int8" for v in per_layer.values()):
        config = QuantConfig(calibration=calibration_method, per_layer=per_layer, reduce_range=int8_reduce_range())
        artifact = quantize_onnx(artifact, calibration, config)
    return int4_weights(artifact, [name for name, p in policy.items() if p.name == "int4w"])


# ---------------------------------------------------------------------------------------------------
# The search.


@dataclass
class HAQResult:
    layers: dict[str, str]  # the chosen precision per layer
    search_budget: dict[str, Any]  # resource, original, target, met
    rows: list[dict[str, Any]]  # per layer: precision, bits, cost, measured or modelled, how it was exported
    accuracy: dict[str, Any]
    latency: dict[str, Any]  # fp32, uniform int8 and the HAQ model, measured interleaved in one run
    size_bytes: dict[str, float]  # ONNX file sizes: fp32 and final
    counted_size_bytes: dict[str, float]  # weights at their bits (what a size budget limits): fp32 and final
    episodes: list[dict[str, Any]]
    cost_table: list[dict[str, Any]]
    unsupported_precisions: dict[str, str]
    search_seconds: float
    simulated_layers: list[str] = field(default_factory=list)
    output_parity: dict[str, Any] | None = None  # the exported model against fp32, checked against the floor

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HAQSetup:
    """Everything a search (or a hand-made policy) is evaluated against: the model and data, the layers with
    their choices and costs, the resolved budget in cost units, and the fp32 / uniform-int8 references."""

    original: LoadedModel
    data: DataBundle
    target: Target
    protocol: Protocol
    opts: HAQOptions
    resource: str = "latency_ms"  # or "size_bytes"
    layers: list[HAQLayer] = field(default_factory=list)
    rows: list[CostRow] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    calibration: Any = None
    fp32_size_bytes: float = 0.0
    fp32_artifact: Any = None
    int8_artifact: Any = None
    resolved: ResolvedBudget | None = None
    target_cost: float = 0.0  # the budget in layer-cost units (table ms or bytes)
    constant_ms: float = 0.0  # latency: what the table's layers miss, fitted to the uniform-int8 measurement
    base_accuracy: float = 0.0  # fp32 top-1 (%) on the validation split
    _accuracy: dict[tuple[str, ...], float] = field(default_factory=dict)

    def policy(self, names: tuple[str, ...]) -> dict[str, Precision]:
        return {layer.name: precision(n) for layer, n in zip(self.layers, names)}

    def fine_tuned(self, names: tuple[str, ...], config) -> nn.Module:
        from squeeze.train import fine_tune

        model = fake_quant_model(self.original.module, self.policy(names), self.ranges)
        fine_tune(model, self.data.train, config, progress=False)
        return model

    def evaluate(self, names: tuple[str, ...]) -> float:
        """Accuracy (%) on the validation split after the short fine-tune; memoized (fine-tunes are seeded)."""
        from squeeze.train import evaluate

        if names not in self._accuracy:
            model = self.fine_tuned(names, self.opts.short_term)
            self._accuracy[names] = 100 * evaluate(model, self.data.val).top1
        return self._accuracy[names]


def _pareto(choices: list[Precision], costs: list[float], measured: list[bool]):
    """Keep a choice only if it is cheaper than every choice with more bits (else it loses accuracy for no
    gain). Input and output ascend in weight bits."""
    keep = []
    best = math.inf
    for c, cost, m in sorted(zip(choices, costs, measured), key=lambda t: -t[0].weight_bits):
        if cost < best:
            keep.append((c, cost, m))
            best = cost
    keep.reverse()
    return [k[0] for k in keep], [k[1] for k in keep], [k[2] for k in keep]


def _layers(search: HAQSetup, table: CostTable, resource: str) -> tuple[list[HAQLayer], list[CostRow]]:
    module, x = search.original.module, search.original.example_input()
    configs = {n: c for n, c in layer_configs(module, x).items() if c.op in ("conv2d", "linear")}
    rows = table.rows(configs, modelled=resource == "size_bytes")
    opts = search.opts
    layers = []
    for i, (name, cfg) in enumerate(configs.items()):
        mine = [r for r in rows if r.layer == name and opts.min_bits <= r.weight_bits <= opts.max_bits
                and r.precision != "fp16"]  # fp16 rows are measured but not mixed into one graph yet
        mine.sort(key=lambda r: (r.weight_bits, r.act_bits))
        choices = [precision(r.precision) for r in mine]
        costs = [r.latency_ms if resource == "latency_ms" else r.size_bytes for r in mine]
        measured = [r.measured for r in mine]
        if resource == "latency_ms":
            choices, costs, measured = _pareto(choices, costs, measured)
        if not choices:
            raise BudgetError(f"Layer {name} has no precision within --min-bits {opts.min_bits} .. "
                              f"--max-bits {opts.max_bits} on {search.target.name}.",
                              "Widen the bit range (the target runs fp32, int8 and 4-bit weight-only Linear).")
        floor = 0
        if opts.keep_first_last and i in (0, len(configs) - 1):
            eight = [j for j, c in enumerate(choices) if c.weight_bits >= 8]
            floor = eight[0] if eight else len(choices) - 1
        layers.append(HAQLayer(name, cfg, choices, costs, measured, floor))
    return layers, rows


def _table_sums(rows: list[CostRow], precision: str) -> float:
    """Table latency of the whole model in one precision (fp32 or int8 everywhere)."""
    by_layer = {r.layer: r.latency_ms for r in rows if r.precision == precision}
    fp32 = {r.layer: r.latency_ms for r in rows if r.precision == "fp32"}
    return sum(by_layer.get(layer, ms) for layer, ms in fp32.items())


def _latency_target(rows: list[CostRow], fp32_ms: float, int8_ms: float, target_ms: float) -> tuple[float, float]:
    """The budget in table units, and C: predicted(policy) = fp32_ms (T(policy) + C) / (T(fp32) + C), with C
    fitted so that the uniform-int8 model predicts its measured latency (as TableOracle.recalibrate)."""
    t_fp32 = _table_sums(rows, "fp32")
    c = fit_table_constant(_table_sums(rows, "int8"), t_fp32, int8_ms / fp32_ms)
    return target_ms / fp32_ms * (t_fp32 + c) - c, c


def _predicted_ms(table_cost: float, rows: list[CostRow], fp32_ms: float, constant: float) -> float:
    return fp32_ms * (table_cost + constant) / (_table_sums(rows, "fp32") + constant)


def _check_inputs(original: LoadedModel, data: DataBundle | None, budget: Budget | None) -> str:
    if original.module is None:
        raise DataError("HAQ needs the torch model (it fine-tunes each candidate); an ONNX file cannot be searched.",
                        "Pass the model as a checkpoint, zoo:NAME or package.module:factory.")
    if data is None:
        raise DataError("HAQ needs data (--data): every candidate precision policy is fine-tuned and evaluated.",
                        "Pass --data digits, a folder of class sub-folders, or package.module:function.")
    if budget is None or budget.macs_ratio is not None and all(
            v is None for v in (budget.latency_ms, budget.latency_ratio, budget.size_bytes)):
        raise BudgetError("HAQ needs a latency or model-size budget.",
                          "Pass --latency 0.6x, --latency-ms N or --size-bytes N (or `budget:` in the recipe).")
    return "latency_ms" if budget.latency_ms is not None or budget.latency_ratio is not None else "size_bytes"


def _size_bytes(search: HAQSetup, policy: dict[str, Precision]) -> float:
    """Model size with each searched layer's weights at its bits (biases 32-bit, other parameters fp32)."""
    return search.fp32_size_bytes + sum(
        layer_size_bytes(layer.config, policy[layer.name].weight_bits) - layer_size_bytes(layer.config, 32)
        for layer in search.layers)


class _Fixed(LatencyOracle):
    """The fp32 model's latency, measured once (interleaved with uniform int8), for resolve_budget."""

    def __init__(self, ms: float) -> None:
        self.ms = ms

    def latency_ms(self, model) -> float:
        return self.ms


def prepare(original: LoadedModel, data: DataBundle | None, target: Target, protocol: Protocol,
            budget: Budget | None, opts: HAQOptions) -> HAQSetup:
    """Layers and their costs on the target, references measured, budget resolved and checked."""
    from squeeze.export.onnx import export_onnx
    from squeeze.quant.calibrate import calibration_data
    from squeeze.quant.ptq import QuantConfig, quantize_onnx
    from squeeze.summary import summarize
    from squeeze.train import evaluate

    setup = HAQSetup(original, data, target, protocol, opts, resource=_check_inputs(original, data, budget))
    setup.fp32_size_bytes = float(summarize(original).size_bytes)
    setup.calibration = calibration_data(data, opts.samples, seed=opts.seed)
    table = CostTable(target)
    setup.unsupported = table.unsupported
    setup.layers, setup.rows = _layers(setup, table, setup.resource)
    setup.ranges = input_ranges(original.module, [layer.name for layer in setup.layers],
                                torch.from_numpy(setup.calibration.inputs))
    setup.fp32_artifact = export_onnx(original)
    setup.int8_artifact = quantize_onnx(setup.fp32_artifact, setup.calibration,
                                        QuantConfig(calibration=opts.calibration,
                                                    reduce_range=int8_reduce_range()))
    fp32_m, int8_m = MeasuredOracle(target, protocol, use_cache=False).measurements(
        [setup.fp32_artifact, setup.int8_artifact])
    fp32_ms, int8_ms = fp32_m.stats.median_ms, int8_m.stats.median_ms
    if setup.resource == "latency_ms":
        setup.resolved = resolve_budget(budget, original, Resource("latency_ms", _Fixed(fp32_ms), _Fixed(fp32_ms)))
        setup.target_cost, setup.constant_ms = _latency_target(setup.rows, fp32_ms, int8_ms, setup.resolved.target)
    else:
        setup.resolved = resolve_budget(budget, original, Resource("size_bytes"))
        fp32_layers = sum(layer_size_bytes(layer.config, 32) for layer in setup.layers)
        setup.target_cost = setup.resolved.target - (setup.resolved.original - fp32_layers)  # the rest stays fp32
    lowest = [layer.floor for layer in setup.layers]
    if cost_of(setup.layers, lowest) > setup.target_cost:
        raise _impossible(setup, names_of(setup.layers, lowest), cost_of(setup.layers, lowest), fp32_ms, int8_ms)
    setup.base_accuracy = 100 * evaluate(original.module, data.val).top1
    log.info(f"haq: {setup.resolved.resource} {setup.resolved.original:.4g} -> budget {setup.resolved.target:.4g}; "
             f"measured fp32 {fp32_ms:.4g} ms, uniform int8 {int8_ms:.4g} ms; {len(setup.layers)} layers")
    return setup


def cost_of(layers: list[HAQLayer], policy: list[int]) -> float:
    return sum(layer.costs[j] for layer, j in zip(layers, policy))


def names_of(layers: list[HAQLayer], policy: list[int]) -> tuple[str, ...]:
    return tuple(layer.choices[j].name for layer, j in zip(layers, policy))


def search(setup: HAQSetup) -> tuple[tuple[str, ...], list, float]:
    """The DDPG episodes; returns the best policy (highest reward, then lowest cost), the episode records
    and the search wall time in seconds."""
    from squeeze.agents import DDPG, DDPGConfig, run_episodes

    started = time.perf_counter()
    opts = setup.opts
    env = HAQEnv(setup.layers, setup.target_cost, setup.evaluate, setup.base_accuracy)
    agent = DDPG(env.states.shape[1], 1, len(setup.layers), DDPGConfig(warmup_episodes=opts.warmup, seed=opts.seed))
    best: dict[str, Any] = {"key": (-math.inf, 0.0)}

    def on_episode(rec) -> None:
        key = (rec.reward, -rec.info["cost"])  # equal rewards: the cheaper policy
        if key > best["key"]:
            best.update(key=key, policy=tuple(rec.info["policy"]))
            log.info(f"haq episode {rec.episode + 1}: new best, reward {rec.reward:+.4f}, val "
                     f"{rec.info['accuracy']:.2f}%, cost {rec.info['cost']:.4g}: {' '.join(rec.info['policy'])}")
        elif (rec.episode + 1) % 10 == 0:
            log.info(f"haq episode {rec.episode + 1}/{opts.episodes}: {len(setup._accuracy)} policies evaluated")

    records = run_episodes(env, agent, opts.episodes, on_episode)
    return best["policy"], records, time.perf_counter() - started


def finish(setup: HAQSetup, names: tuple[str, ...], records: list | None = None, search_seconds: float = 0.0
           ) -> tuple[LoadedModel, OnnxArtifact, HAQResult]:
    """Fine-tune `names` (one precision per layer) longer, export it as one ONNX model, and measure it
    interleaved with fp32 and uniform int8. Returns the fine-tuned float model, the artifact, the record."""
    from squeeze.train import evaluate

    data, opts, resolved = setup.data, setup.opts, setup.resolved
    chosen = setup.policy(names)
    simulated = [n for n, p in chosen.items() if not p.kernel]
    tuned = setup.fine_tuned(names, opts.long_term)
    torch_top1 = None if simulated else evaluate(tuned, data.held_out()[1]).top1
    final_model = _with_module(setup.original, strip_fake_quant(tuned, set(simulated)))
    artifact = export_policy(final_model, chosen, setup.calibration, opts.calibration)
    final_m, fp32_m, int8_m = MeasuredOracle(setup.target, setup.protocol, use_cache=False).measurements(
        [artifact, setup.fp32_artifact, setup.int8_artifact])
    haq_ms, fp32_ms, int8_ms = (m.stats.median_ms for m in (final_m, fp32_m, int8_m))
    budget_json: dict[str, Any] = asdict(resolved)
    counted = {"fp32": setup.fp32_size_bytes, "final": _size_bytes(setup, chosen)}
    if setup.resource == "latency_ms":
        # Within 2% of the budget: readings of the same model vary about that much (as the pruning searches).
        budget_json["met"] = haq_ms / fp32_ms <= 1.02 * resolved.ratio
    else:
        budget_json["met"] = counted["final"] <= resolved.target
    policy_cost = sum(layer.costs[layer.choices.index(chosen[layer.name])] for layer in setup.layers)
    result = HAQResult(
        layers={n: p.name for n, p in chosen.items()},
        search_budget=budget_json,
        rows=[_row(layer, chosen[layer.name]) for layer in setup.layers],
        accuracy=_accuracies(setup, artifact, names, torch_top1),
        latency={
            "fp32_ms": fp32_ms, "uniform_int8_ms": int8_ms, "haq_ms": haq_ms, "haq_vs_fp32": haq_ms / fp32_ms,
            "uniform_int8_vs_fp32": int8_ms / fp32_ms, "table_constant_ms": setup.constant_ms,
            "predicted_haq_ms": _predicted_ms(policy_cost, setup.rows, fp32_ms, setup.constant_ms)
            if setup.resource == "latency_ms" else None,
            "measurements": {"haq": final_m.to_json(), "fp32": fp32_m.to_json(), "uniform_int8": int8_m.to_json()},
        },
        size_bytes={"fp32": float(setup.fp32_artifact.path.stat().st_size),
                    "final": float(artifact.path.stat().st_size)},
        counted_size_bytes=counted, episodes=[r.to_json() for r in records or []],
        cost_table=[r.to_json() for r in setup.rows], unsupported_precisions=setup.unsupported,
        search_seconds=search_seconds, simulated_layers=simulated)
    return final_model, artifact, result


def haq_search(original: LoadedModel, data: DataBundle | None, target: Target, protocol: Protocol,
               budget: Budget | None, opts: HAQOptions) -> tuple[LoadedModel, OnnxArtifact, HAQResult]:
    """Prepare, search, then fine-tune, export and measure the best policy (see `finish`). Should the
    measurement miss a latency budget, the table is re-fitted to it and the wall lowers the policy further
    (at most `_RETRIES` times); a budget still missed is reported as such."""
    started = time.perf_counter()
    setup = prepare(original, data, target, protocol, budget, opts)
    names, records, _ = search(setup)
    for attempt in range(_RETRIES + 1):
        model, artifact, result = finish(setup, names, records, time.perf_counter() - started)
        if result.search_budget["met"] or setup.resource != "latency_ms" or attempt == _RETRIES:
            break
        lower = _refit_and_lower(setup, names, result.latency["haq_vs_fp32"])
        if lower == names:
            break
        log.info(f"haq: measured {result.latency['haq_vs_fp32']:.3f}x misses the budget "
                 f"({setup.resolved.ratio:.3f}x); table re-fitted, policy lowered to {' '.join(lower)}")
        names = lower
    from squeeze.quant.parity import OrtParity
    from squeeze.quant.run import final_parity

    parity = OrtParity(setup.fp32_artifact, data, opts.parity_samples)
    result.output_parity = final_parity(
        "The HAQ model", parity, artifact, opts,
        fix="Relax the budget (more bits), search longer (--episodes), or lower the floor (--min-agreement, "
            "--max-accuracy-drop) if that loss is acceptable.")
    return model, artifact, result


_RETRIES = 2


def _refit_and_lower(setup: HAQSetup, names: tuple[str, ...], measured_ratio: float) -> tuple[str, ...]:
    """Fit the table constant so that `names` predicts its measured ratio to fp32, re-derive the budget in
    table units, and run the wall on `names` again."""
    policy = [layer.choices.index(precision(n)) for layer, n in zip(setup.layers, names)]
    t_policy, t_fp32 = cost_of(setup.layers, policy), _table_sums(setup.rows, "fp32")
    setup.constant_ms = fit_table_constant(t_policy, t_fp32, measured_ratio, setup.constant_ms)
    setup.target_cost = setup.resolved.ratio * (t_fp32 + setup.constant_ms) - setup.constant_ms
    floors = [layer.floor for layer in setup.layers]
    return names_of(setup.layers, budget_wall(policy, [layer.costs for layer in setup.layers], floors,
                                              setup.target_cost))


def _accuracies(setup: HAQSetup, haq: OnnxArtifact, names: tuple[str, ...], torch_top1: float | None
                ) -> dict[str, Any]:
    """Top-1 of the exported files through ONNX Runtime on the test split (val when there is none)."""
    from squeeze.train import evaluate_onnx

    split_name, split = setup.data.held_out()
    return {
        "split": split_name,
        "fp32_top1": evaluate_onnx(setup.fp32_artifact, split).top1,
        "uniform_int8_ptq_top1": evaluate_onnx(setup.int8_artifact, split).top1,
        "haq_top1": evaluate_onnx(haq, split).top1,
        "haq_torch_fake_quant_top1": torch_top1,  # the same model in torch (None with simulated layers)
        "val_fp32_pct": setup.base_accuracy,
        "val_after_short_fine_tune_pct": setup.evaluate(names),
    }


def _row(layer: HAQLayer, p: Precision) -> dict[str, Any]:
    j = layer.choices.index(p)
    return {"layer": layer.name, "precision": p.name, "weight_bits": p.weight_bits, "act_bits": p.act_bits,
            "cost": layer.costs[j], "measured": layer.measured[j], "exported_as": _exported_as(p),
            "choices": [c.name for c in layer.choices]}


def _exported_as(p: Precision) -> str:
    if p.name == "int4w":
        return "MatMulNBits, 4-bit weights"
    if p.name == "int8":
        return "QDQ int8"
    if not p.kernel:
        return f"simulated: {p.weight_bits}-bit weight grid stored in int8 QDQ, runs as int8"
    return "float"


def _with_module(original: LoadedModel, module: nn.Module) -> LoadedModel:
    from squeeze.model import LoadedModel

    return LoadedModel(original.name, original.kind, original.input_shape, module.eval(), arch=original.arch,
                       plans=list(original.plans), metadata=dict(original.metadata))


def _impossible(setup: HAQSetup, names: tuple[str, ...], min_cost: float, fp32_ms: float, int8_ms: float
                ) -> BudgetError:
    resolved = setup.resolved
    cheapest = ", ".join(f"{layer.name}={n}" for layer, n in zip(setup.layers, names))
    if setup.resource == "latency_ms":
        ratio = _predicted_ms(min_cost, setup.rows, fp32_ms, setup.constant_ms) / fp32_ms
        return BudgetError(
            f"No precision policy meets the latency budget of {resolved.target:.4g} ms ({resolved.ratio:.2f}x the "
            f"measured fp32 {fp32_ms:.4g} ms) on {setup.target.name}: the fastest one ({cheapest}) is predicted at "
            f"{ratio:.2f}x, and uniform int8 measured {int8_ms:.4g} ms ({int8_ms / fp32_ms:.2f}x).",
            f"Ask for {math.ceil(100 * ratio) / 100}x or more, or use a model-size budget (--size-bytes), which also "
            "allows 2..7-bit weights.")
    rest = resolved.original - sum(layer_size_bytes(layer.config, 32) for layer in setup.layers)
    return BudgetError(
        f"No precision policy meets the size budget of {resolved.target:.0f} bytes: the smallest one ({cheapest}) "
        f"counts {min_cost + rest:.0f} bytes (fp32: {resolved.original:.0f}).",
        "Ask for more bytes, lower min_bits (2 at the least), or let the first and last layers go below 8 bits "
        "(keep_first_last: false).")
