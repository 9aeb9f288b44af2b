"""Multi-dimensional pruning's engine (Guo et al., CVPR 2020): a conv run at a reduced resolution, the
over-parameterised search layer, learnable channel gates, and the "multidim" plan kind.

A conv at scale 1/f runs on its input average-pooled by f (per spatial dim; for a Conv3d also in time) and
its output is resized back to the size it had at full resolution, so the rest of the network is unchanged:

    ScaledConv:       x -> AvgPool(f) -> conv -> Upsample(size of conv(x))
    MultiBranchConv:  sum_i softmax(alpha)_i * ScaledConv_i(x), one branch per candidate f, one shared conv

The pool and the resize are modules marked `lut_priced`, so a lookup table prices a scaled conv as three
entries (pool, conv at the reduced size, resize). A plan records per conv the scale it runs at and, as a
channel plan, the output channels kept; it replays on the original architecture (channels first, then the
resolution wrappers) before a checkpoint's state_dict loads:

    {"kind": "multidim", "version": 1, "upsample": "nearest",
     "scales": {"conv3.0": [0.5, 0.5]}, "channels": {"kind": "channels", ...} | null}
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from squeeze.measure.lut import LayerConfig, layer_configs, priced, resize
from squeeze.model.loading import register_plan_kind
from squeeze.prune.engine import apply_plan, replay_channel_plan
from squeeze.prune.plan import ChannelPlan, PlanError, plan_from_json, plan_to_json

__all__ = ["MULTIDIM_KIND", "Factors", "MultiDimPlan", "ScaledConv", "MultiBranchConv", "apply_multidim",
           "apply_scales", "attach_gates", "branch_configs", "candidate_factors", "collapse", "conv_input_shapes",
           "full_size", "multidim_from_json", "norms_after", "replay_multidim_plan", "supernet"]

MULTIDIM_KIND = "multidim"
MULTIDIM_VERSION = 1
UPSAMPLE_MODES = ("nearest", "bilinear")

# Pooling factor per dim the conv slides over: (fh, fw) for Conv2d, (ft, fh, fw) for Conv3d; scale = 1 / f.
Factors = tuple[int, ...]

_CONVS = (nn.Conv2d, nn.Conv3d)


def full_size(conv: nn.Conv2d | nn.Conv3d, in_size: tuple[int, ...]) -> tuple[int, ...]:
    """The conv's output size (per spatial/temporal dim) at full resolution."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                 zip(in_size, conv.padding, conv.dilation, conv.kernel_size, conv.stride))


def _mode(mode: str, dims: int) -> str:
    return "trilinear" if mode == "bilinear" and dims == 3 else mode


class ScaledConv(nn.Module):
    """`conv` at resolution 1/factors: average pool -> conv (-> its BatchNorm) -> resize to the full-resolution
    output size. The conv keeps its parameters (they load as `<name>.conv.weight`). A BatchNorm that read the
    conv's output runs before the resize (`<name>.norm`, an Identity at its old place): a per-channel affine
    commutes with nearest and linear resizing (their weights sum to 1), and next to the conv the runtime folds
    it into the conv's weights instead of running it at full resolution."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, factors: Factors, out_size: tuple[int, ...],
                 mode: str = "nearest", norm: nn.Module | None = None) -> None:
        super().__init__()
        dims = len(factors)
        pool = nn.AvgPool2d if dims == 2 else nn.AvgPool3d
        self.pool = priced(pool(tuple(factors), tuple(factors)))
        self.conv = conv
        self.norm = norm if norm is not None else nn.Identity()
        self.upsample = priced(resize(tuple(out_size), _mode(mode, dims)))
        self.factors = tuple(factors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.norm(self.conv(self.pool(x))))


class MultiBranchConv(nn.Module):
    """The search layer: the conv at every candidate resolution, mixed by softmax(alpha). The branch weights
    are architecture parameters; the conv's weights are shared by all branches."""

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, candidates: list[Factors], out_size: tuple[int, ...],
                 mode: str = "nearest") -> None:
        super().__init__()
        self.conv = conv
        self.candidates = [tuple(f) for f in candidates]
        self.out_size = tuple(out_size)
        self.mode = _mode(mode, len(out_size))
        self.alpha = nn.Parameter(torch.zeros(len(candidates)))

    def probs(self) -> torch.Tensor:
        return F.softmax(self.alpha, dim=0)

    def branch(self, x: torch.Tensor, factors: Factors) -> torch.Tensor:
        if all(f == 1 for f in factors):
            return self.conv(x)
        pool = F.avg_pool2d if len(factors) == 2 else F.avg_pool3d
        y = self.conv(pool(x, factors, factors))
        return F.interpolate(y, size=self.out_size, mode=self.mode,
                             align_corners=None if self.mode == "nearest" else False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.probs()
        out = p[0] * self.branch(x, self.candidates[0])
        for i in range(1, len(self.candidates)):
            out = out + p[i] * self.branch(x, self.candidates[i])
        return out


def conv_input_shapes(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Conv2d/Conv3d name -> the shape of its input, from one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def fn(_m, inputs, _out) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))
        return fn

    _run_hooked(module, x, [m.register_forward_hook(hook(n)) for n, m in module.named_modules()
                            if isinstance(m, _CONVS)])
    return shapes


def _run_hooked(module: nn.Module, x: torch.Tensor, handles: list) -> None:
    """One forward pass in eval mode without gradients, then the hooks removed and the mode restored."""
    training = module.training
    try:
        with torch.no_grad():
            module.eval()(x)
    finally:
        module.train(training)
        for h in handles:
            h.remove()


def candidate_factors(conv: nn.Module, in_shape: tuple[int, ...], spatial: tuple[int, ...] = (1, 2, 4),
                      temporal: tuple[int, ...] = (1,), min_side: int = 1) -> list[Factors]:
    """The pooling factors a conv may run at: every spatial factor (and, for a Conv3d, temporal factor) that
    leaves the input at least `min_side` pixels (and frames) a side; full resolution first."""
    size = in_shape[2:]
    space = [f for f in sorted(set(spatial) | {1}) if f == 1 or all(n // f >= min_side for n in size[-2:])]
    if isinstance(conv, nn.Conv3d):
        time = [t for t in sorted(set(temporal) | {1}) if t == 1 or size[0] // t >= min(min_side, 2)]
        return [(t, f, f) for t in time for f in space]
    return [(f, f) for f in space]


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def collapse(net: nn.Module, layers: Mapping[str, MultiBranchConv]) -> nn.Module:
    """In place: each MultiBranchConv back to its plain conv (the original architecture, the trained weights)."""
    for name, layer in layers.items():
        _set_submodule(net, name, layer.conv)
    return net


def supernet(module: nn.Module, x: torch.Tensor, candidates: Mapping[str, list[Factors]],
             mode: str = "nearest") -> tuple[nn.Module, dict[str, MultiBranchConv]]:
    """A deep copy of `module` with each conv in `candidates` replaced by its MultiBranchConv."""
    net = copy.deepcopy(module)
    shapes = conv_input_shapes(net, x)
    layers = {}
    for name, factors in candidates.items():
        conv = net.get_submodule(name)
        layers[name] = MultiBranchConv(conv, factors, full_size(conv, shapes[name][2:]), mode)
        _set_submodule(net, name, layers[name])
    return net, layers


def norms_after(module: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, str]:
    """Layer name -> the name of the BatchNorm that reads its output, for the named layers that have one."""
    outputs: dict[int, tuple[weakref.ref, str]] = {}  # weak: a freed tensor's id is reused by later ones
    norms: dict[str, str] = {}
    by_name = dict(module.named_modules())

    def record(name: str):
        def fn(_m, _inputs, out) -> None:
            outputs[id(out)] = (weakref.ref(out), name)
        return fn

    def follow(norm: str):
        def fn(_m, inputs, _out) -> None:
            ref, name = outputs.get(id(inputs[0]), (None, None))
            if ref is not None and ref() is inputs[0]:
                norms[name] = norm
        return fn

    handles = [by_name[n].register_forward_hook(record(n)) for n in names]
    handles += [m.register_forward_hook(follow(n)) for n, m in module.named_modules()
                if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))]
    _run_hooked(module, x, handles)
    return norms


def attach_gates(module: nn.Module, names: list[str], x: torch.Tensor
                 ) -> tuple[dict[str, nn.Parameter], dict[str, nn.Module], list]:
    """A learnable gate per output channel of each named layer (initialised to 1), multiplied into the
    output of the BatchNorm that reads the layer's output (a gate before a BN in training mode would be
    normalised away), or into the layer's output where no BN follows. Returns the gates, the module each
    scales, and the hook handles."""
    by_name = dict(module.named_modules())
    norms = norms_after(module, names, x)
    targets = {n: by_name[norms.get(n, n)] for n in names}
    gates, hooks = {}, []
    for name in names:
        gate = nn.Parameter(torch.ones(_out_channels(by_name[name])))
        gates[name] = gate

        def apply(_m, _inputs, out, gate=gate):
            return out * gate.view(1, -1, *([1] * (out.dim() - 2)))

        hooks.append(targets[name].register_forward_hook(apply))
    return gates, targets, hooks


def _out_channels(m: nn.Module) -> int:
    return m.conv.out_channels if isinstance(m, (ScaledConv, MultiBranchConv)) else m.out_channels


def branch_configs(conv: nn.Conv2d | nn.Conv3d, in_shape: tuple[int, ...], factors: Factors,
                   mode: str = "nearest") -> list[LayerConfig]:
    """The lookup-table configurations of `conv` run at `factors` (pool, conv, resize; the conv alone at 1):
    what the table sums for it in the pruned model."""
    if all(f == 1 for f in factors):
        layer: nn.Module = conv
    else:
        layer = ScaledConv(conv, factors, full_size(conv, in_shape[2:]), mode)
    training = conv.training
    try:
        return list(layer_configs(layer, torch.zeros(in_shape)).values())
    finally:
        conv.train(training)


@dataclass
class MultiDimPlan:
    """Per conv, the pooling factors it runs at (absent: full resolution), and the channels kept."""

    factors: dict[str, Factors]
    channels: ChannelPlan | None = None
    upsample: str = "nearest"
    kind: str = field(default=MULTIDIM_KIND, init=False)

    def to_json(self) -> dict[str, Any]:
        return {"kind": MULTIDIM_KIND, "version": MULTIDIM_VERSION, "upsample": self.upsample,
                "scales": {n: [1 / f for f in fs] for n, fs in self.factors.items()},
                "channels": None if self.channels is None else plan_to_json(self.channels)}


def multidim_from_json(obj: MultiDimPlan | Mapping[str, Any]) -> MultiDimPlan:
    """Parse and check a multidim plan (as a checkpoint or report holds it); the channel part is checked as a
    channel plan."""
    if isinstance(obj, MultiDimPlan):
        return obj
    if not isinstance(obj, Mapping):
        raise PlanError(f"A multidim plan must be a JSON object, got {type(obj).__name__}.")
    if obj.get("kind") != MULTIDIM_KIND:
        raise PlanError(f"plan.kind is {obj.get('kind')!r}, expected {MULTIDIM_KIND!r}.")
    if obj.get("version") != MULTIDIM_VERSION:
        raise PlanError(f"multidim plan version {obj.get('version')!r} is not supported (this squeeze reads "
                        f"{MULTIDIM_VERSION}).", "Upgrade squeeze to replay plans written by a newer version.")
    mode = obj.get("upsample", "nearest")
    if mode not in UPSAMPLE_MODES:
        raise PlanError(f"plan.upsample is {mode!r}; expected one of {', '.join(UPSAMPLE_MODES)}.")
    factors = {}
    for name, scales in dict(obj.get("scales") or {}).items():
        fs = tuple(round(1 / s) if isinstance(s, (int, float)) and s > 0 else 0 for s in scales)
        if not fs or any(f < 1 or abs(f * s - 1) > 1e-6 for f, s in zip(fs, scales)):
            raise PlanError(f"plan.scales[{name!r}] = {scales!r}: each scale must be 1/k for an integer k >= 1.")
        factors[str(name)] = fs
    channels = obj.get("channels")
    return MultiDimPlan(factors, None if channels is None else plan_from_json(channels), mode)


def apply_scales(module: nn.Module, factors: Mapping[str, Factors], x: torch.Tensor,
                 mode: str = "nearest") -> nn.Module:
    """In place: each named conv with a factor above 1 becomes a ScaledConv (with the BatchNorm that reads it)."""
    shapes = conv_input_shapes(module, x)
    norms = norms_after(module, [n for n, fs in factors.items() if n in shapes and any(f > 1 for f in fs)], x)
    for name, fs in factors.items():
        if all(f == 1 for f in fs):
            continue
        conv = module.get_submodule(name) if name in shapes else None
        if not isinstance(conv, _CONVS):
            raise PlanError(f"plan.scales names {name!r}, which is not a Conv2d/Conv3d the model runs.")
        if len(fs) != conv.weight.dim() - 2 or any(n < f for n, f in zip(shapes[name][2:], fs)):
            raise PlanError(f"plan.scales[{name!r}] does not fit the layer's input {shapes[name][2:]}.")
        norm = module.get_submodule(norms[name]) if name in norms else None
        if norm is not None:
            _set_submodule(module, norms[name], nn.Identity())
        _set_submodule(module, name, ScaledConv(conv, fs, full_size(conv, shapes[name][2:]), mode, norm))
    return module


def apply_multidim(module: nn.Module, plan: MultiDimPlan | Mapping[str, Any], x: torch.Tensor) -> nn.Module:
    """A deep copy of `module` with the plan's channels pruned and its convs run at the plan's scales."""
    plan = multidim_from_json(plan)
    net = apply_plan(module, plan.channels, x) if plan.channels is not None else copy.deepcopy(module)
    return apply_scales(net, plan.factors, x, plan.upsample)


@register_plan_kind(MULTIDIM_KIND)
def replay_multidim_plan(module: nn.Module, plan: Mapping[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """Checkpoint loading: the channel plan, then the resolution wrappers, in place on the fresh architecture."""
    parsed = multidim_from_json(plan)
    if parsed.channels is not None:
        module = replay_channel_plan(module, plan["channels"], input_shape)
    return apply_scales(module, parsed.factors, torch.zeros(tuple(input_shape)), parsed.upsample)

