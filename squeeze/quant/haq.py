"""HAQ's engine (Wang et al., CVPR 2019; code mit-han-lab/haq): the agent's environment, the budget wall,
the fake-quantized model each policy is fine-tuned as, and the export of a policy. The method (`quant.haq`:
options, the costs, the search, the report) is squeeze.methods.quant.haq.

One episode walks the quantizable layers (Conv2d, Linear) in forward order. Per layer the agent sees a
normalized state (index, depthwise?, fc?, c_in, c_out, stride, kernel, weight count, input area, previous
action) and answers a in [0, 1]; a picks one of the layer's precisions ordered by weight bits, as HAQ's
`round(a (b_max - b_min + 1) + b_min - 0.5)` does over consecutive bit widths (`action_to_index`). After the
last layer the budget wall walks from the last layer back, one step lower per layer and sweep, until the
policy's cost fits the budget (`budget_wall`). The policy is then fine-tuned briefly with fake quantization
in torch and evaluated on the validation split; reward = 0.1 x (accuracy - fp32 accuracy) in percentage
points, credited to every step of the episode (squeeze.agents.ddpg).

Why the reward comes from torch fake quantization and not from each policy's ORT export: the per-episode
fine-tune has to run in torch anyway, the fake-quant forward uses ORT's own rules (per-channel symmetric
int8 weights with range max|w| / 127, asymmetric uint8 activations over the calibrated min/max including
0, MatMulNBits' block-wise 4-bit rounding), and it costs no export, quantization or ORT session per
episode. The final policy is exported through `quantize_onnx` and evaluated through ORT; the report gives
both accuracies, so their agreement is visible.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.measure.lut import LayerConfig
from squeeze.quant.costs import Precision
from squeeze.quant.fakequant import fake_int4_weight, fake_quant_weight, int8_reduce_range, round_ste, weight_levels
from squeeze.quant.mixed import INT4_BLOCK

if TYPE_CHECKING:
    from squeeze.export.artifact import OnnxArtifact
    from squeeze.model.loading import LoadedModel

__all__ = ["action_to_index", "budget_wall", "cost_of", "names_of", "HAQLayer", "HAQEnv", "fake_quant_model",
           "strip_fake_quant", "input_ranges", "export_policy"]

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


def cost_of(layers: list[HAQLayer], policy: list[int]) -> float:
    return sum(layer.costs[j] for layer, j in zip(layers, policy))


def names_of(layers: list[HAQLayer], policy: list[int]) -> tuple[str, ...]:
    return tuple(layer.choices[j].name for layer, j in zip(layers, policy))


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
