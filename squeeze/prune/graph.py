"""Which output channels of a model can be pruned, and which layers change with them.

torch-pruning's DependencyGraph traces one forward pass and links every layer whose channel count
must change together: convs feeding the same residual add, a depthwise conv and its producer, the
BatchNorm after a conv, the slice of a concatenation that a conv fills. Each independent set of
output channels is one pruning group; squeeze names a group after its root: the first
non-depthwise Conv1d/Conv2d/Conv3d/Linear of the group in module order (`stem.0.0` for ResNet's stem + stage-1
residual group). Depthwise convs follow their producer and are never roots.

Never pruned: the layer whose output is the model output (the classifier) and the model input's
channels (only output channels of layers are pruned, so the first conv's input stays); channels that
pass through a reshape moving them across dimensions (ShuffleNet's channel shuffle: view (B, g, C/g,
H, W), transpose, view back): torch-pruning maps indices through a reshape only for a flatten into a
Linear (or back), so it would cut the wrong channels (or fail dividing by zero while inferring the
shapes). Such reshapes are found in the traced forward and left out of its index mapping; every group
reaching one stays whole, with that reason, and the rest of the model is pruned. (A ShuffleNetV2 stream
could not shrink anyway while computing the same function: the shuffle pairs channel j of one half with
channel j of the other, and the next unit's split must stay even, which pins the kept set to dyadic
patterns over every unit of the stage.)
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode

from squeeze.errors import first_line
from squeeze.prune.plan import PruneError

__all__ = [
    "Coupling",
    "LayerSpec",
    "LayerTable",
    "PrunableLayer",
    "SkippedLayer",
    "flatten_tensors",
    "frozen_index_mapping",
    "out_pruning_fn",
    "prunable_layers",
    "trace_coupling",
]

_ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
# Where the traced graph carries the autograd nodes of channel-moving reshapes (see _ChannelReshapes).
_RESHAPES_ATTR = "squeeze_channel_reshapes"
# Layers whose reuse within one forward we watch: pruning a shared layer is ambiguous.
_PARAM_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class LayerSpec:
    """One Conv/Linear as traced with the example input (what a latency table or AMC state needs)."""

    name: str
    type: str  # "Conv1d" | "Conv2d" | "Conv3d" | "Linear"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]  # (kH, kW) for Conv2d, (kT, kH, kW) for Conv3d, (1, 1) for Linear
    stride: tuple[int, ...]
    groups: int
    input_hw: tuple[int, ...] | None  # the input's spatial size: (H, W), (T, H, W) for Conv3d; None for Linear


@dataclass(frozen=True)
class PrunableLayer:
    """One pruning group, named after its root layer; the root's own shape is given."""

    name: str
    type: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    groups: int
    input_hw: tuple[int, ...] | None
    coupled: tuple[str, ...]  # other Conv2d/Linear whose OUTPUT channels are pruned with it (incl. depthwise)
    consumers: tuple[str, ...]  # Conv2d/Linear whose INPUT channels shrink with it
    channel_step: int = 1  # kept count must be a multiple (grouped convs: same count per group)
    prunable: bool = True
    reason: str = ""  # why not prunable

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SkippedLayer:
    """A Conv/Linear that is neither a pruning root nor pruned with one, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class LayerTable(Sequence):
    """The prunable layers of a model, in module order; also indexable by name.

    `layers` includes groups that cannot be pruned (`prunable=False`, with a reason, e.g. the
    classifier); `skipped` lists Conv/Linear layers the graph does not handle; `specs` has the traced
    shape of every Conv1d/2d/3d and Linear (coupled and consumer layers too).
    """

    layers: tuple[PrunableLayer, ...]
    skipped: tuple[SkippedLayer, ...] = ()
    specs: dict[str, LayerSpec] = field(default_factory=dict)

    def __getitem__(self, key):  # int/slice -> position, str -> name
        if isinstance(key, str):
            for layer in self.layers:
                if layer.name == key:
                    return layer
            raise KeyError(key)
        return self.layers[key]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[PrunableLayer]:
        return iter(self.layers)

    def __contains__(self, item: object) -> bool:  # a name or a PrunableLayer
        return any(item in (layer.name, layer) for layer in self.layers)

    def names(self, prunable_only: bool = True) -> list[str]:
        return [layer.name for layer in self.layers if layer.prunable or not prunable_only]

    def widths(self) -> dict[str, int]:
        """Current output channels of every prunable layer."""
        return {layer.name: layer.out_channels for layer in self.layers if layer.prunable}

    def not_pruned(self) -> dict[str, str]:
        """Layer name -> why it keeps its output channels: unprunable groups (named by their root) and
        skipped layers."""
        return {**{layer.name: layer.reason for layer in self.layers if not layer.prunable},
                **{s.name: s.reason for s in self.skipped}}

    def root_of(self, name: str) -> str | None:
        """The root a coupled layer is pruned with (None for roots and unknown names)."""
        return next((layer.name for layer in self.layers if name in layer.coupled), None)

    def to_json(self) -> dict[str, Any]:
        return {"layers": [layer.to_json() for layer in self.layers],
                "skipped": [asdict(s) for s in self.skipped]}


@dataclass
class Coupling:
    """A traced module (modified in place by pruning), its graph, its table and full-index groups."""

    module: nn.Module
    graph: tp.DependencyGraph
    table: LayerTable
    roots: dict[str, nn.Module]  # root name -> module (prunable or not)
    groups: dict[str, Any]  # root name -> tp Group over ALL its output channels (for scoring)
    output_shapes: list[tuple[int, ...]]  # of the model outputs before pruning
    training: bool  # the module's mode before tracing (restored after)


def out_pruning_fn(module: nn.Module):
    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def prunable_layers(module: nn.Module, example_input: torch.Tensor) -> LayerTable:
    """Trace a copy of `module` and return its pruning groups (the module itself is not touched)."""
    return trace_coupling(copy.deepcopy(module), example_input).table


def trace_coupling(module: nn.Module, example_input: torch.Tensor) -> Coupling:
    """Build the dependency graph of `module` (traced in place: pass a copy you own)."""
    training = module.training
    module.eval()  # a traced forward must not update BatchNorm statistics
    try:
        specs, calls = _record_specs(module, example_input)
        graph, outputs, readers = _build_graph(module, example_input)
        fixed = _FixedChannels({t.grad_fn for t in outputs if t.grad_fn is not None}, readers,
                               getattr(graph, _RESHAPES_ATTR))
        layers, roots, groups, skipped = _collect_groups(module, graph, specs, calls, fixed)
    finally:
        module.train(training)
    table = LayerTable(tuple(layers), tuple(skipped), specs)
    return Coupling(module, graph, table, roots, groups, [tuple(t.shape) for t in outputs], training)


# --- tracing ---------------------------------------------------------------------------------------


def _spec(name: str, m: nn.Module, inp: torch.Tensor) -> LayerSpec:
    if isinstance(m, nn.Linear):
        return LayerSpec(name, "Linear", m.in_features, m.out_features, (1, 1), (1, 1), 1, None)
    # ConvNd input: (N, C, *spatial) or unbatched (C, *spatial), len(spatial) = len(kernel_size)
    spatial = tuple(inp.shape[-len(m.kernel_size):])
    return LayerSpec(name, type(m).__name__, m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride),
                     m.groups, spatial)


def _record_specs(module: nn.Module, x: torch.Tensor) -> tuple[dict[str, LayerSpec], dict[nn.Module, int]]:
    """One forward with hooks: input spatial size of each Conv/Linear and how often each layer runs."""
    specs: dict[str, LayerSpec] = {}
    calls: dict[nn.Module, int] = {}

    def hook(name):
        def record(m, inputs, _out) -> None:
            calls[m] = calls.get(m, 0) + 1
            if isinstance(m, _ROOT_TYPES) and name not in specs and inputs and torch.is_tensor(inputs[0]):
                specs[name] = _spec(name, m, inputs[0])

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if isinstance(m, _PARAM_TYPES)]
    try:
        with torch.no_grad():
            module(x)
    except Exception as exc:
        raise PruneError(f"The model failed on the example input of shape {tuple(x.shape)} "
                         f"({first_line(exc)}).", "Pass an input shape the model accepts.") from exc
    finally:
        for h in handles:
            h.remove()
    return specs, calls


def flatten_tensors(obj) -> list[torch.Tensor]:
    """The tensors of a model output (tensor, or nested list/tuple/dict of them), in order."""
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in flatten_tensors(o)]
    return []


def _build_graph(module: nn.Module, x: torch.Tensor) -> tuple[tp.DependencyGraph, list[torch.Tensor], set]:
    """DependencyGraph of the module, the traced model outputs, and the graph nodes that read the input."""
    outputs: list[torch.Tensor] = []
    reshapes = _ChannelReshapes()

    def forward_fn(m, inp):
        with reshapes:
            out = m(inp)
        outputs.extend(flatten_tensors(out))
        return out

    # The graph is read from autograd: every parameter must require grad while tracing. The input
    # does too, so ops reading it directly can be found (torch-pruning ignores autograd leaves).
    for p in module.parameters():
        p.requires_grad_(True)
    leaf = x.detach().requires_grad_(True)
    graph = tp.DependencyGraph()
    setattr(graph, _RESHAPES_ATTR, reshapes.grad_fns)  # filled by the forward, read by the index mapping
    try:
        with torch.enable_grad(), _channel_reshapes_unmapped(), warnings.catch_warnings():
            # Parameters outside a layer (layer scales) are pruned along their last non-singleton dim:
            # the channels for the (C, 1, 1), (1, C, 1, 1) and channels-last (C,) shapes they come in.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            graph.build_dependency(module, example_inputs=leaf, forward_fn=forward_fn, verbose=False)
    except Exception as exc:
        raise PruneError(f"torch-pruning could not trace the model ({first_line(exc)}).",
                         "Structural pruning needs a model traceable by autograd with one tensor input.") from exc
    readers = {node for node in graph.module2node.values() if _reads(node.grad_fn, leaf)}
    return graph, outputs, readers


class _ChannelReshapes(TorchFunctionMode):
    """Records the autograd nodes of reshapes (view, reshape, flatten...) that move channels across
    dimensions: (N, C, ...) -> (N, C', ...) with C' != C, other than a flatten into a Linear or back."""

    def __init__(self) -> None:
        super().__init__()
        self.grad_fns: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[0] if args else None
        fn = out.grad_fn if torch.is_tensor(out) else None
        # torch-pruning's own test for a reshape node (dependency/graph.py)
        if fn is not None and torch.is_tensor(src) and ("view" in fn.name().lower() or "reshape" in fn.name().lower()):
            if _moves_channels(tuple(src.shape), tuple(out.shape)):
                self.grad_fns.add(fn)
        return out


def _moves_channels(src: tuple[int, ...], out: tuple[int, ...]) -> bool:
    if len(src) < 2 or len(out) < 2 or src[1] == out[1]:
        return False
    flatten = len(out) == 2 and out[1] == math.prod(src[1:])  # (N, C, H, W) -> (N, C*H*W)
    unflatten = len(src) == 2 and src[1] == math.prod(out[1:])  # (N, C*H*W) -> (N, C, H, W)
    return not (flatten or unflatten)


@contextlib.contextmanager
def _channel_reshapes_unmapped():
    """torch-pruning maps indices through every reshape as if it were a flatten; through a channel
    shuffle that cuts the wrong channels or divides by zero. Skip the reshapes recorded on the graph
    (every group reaching one is kept whole). Swaps a torch-pruning module global like
    frozen_index_mapping; a no-op where that global does not exist."""
    mapping = getattr(tp.dependency, "index_mapping", None)
    real = getattr(mapping, "update_reshape_index_mapping", None)
    if real is None:
        yield
        return

    def update_unless_channel_reshape(graph, node) -> None:
        if node.grad_fn not in getattr(graph, _RESHAPES_ATTR, ()):
            real(graph, node)

    mapping.update_reshape_index_mapping = update_unless_channel_reshape
    try:
        yield
    finally:
        mapping.update_reshape_index_mapping = real


def _reads(grad_fn, leaf: torch.Tensor) -> bool:
    nexts = getattr(grad_fn, "next_functions", ()) or ()
    return any(f is not None and getattr(f, "variable", None) is leaf for f, _ in nexts)


# --- grouping ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen_index_mapping(graph: tp.DependencyGraph):
    """Compute concat/split index offsets once for a block of get_pruning_group calls.

    torch-pruning 1.6 recomputes them over the whole graph on every get_pruning_group call (~25 ms
    each on DenseNet-121, times 120 groups); while the model is not modified they cannot change.
    Swaps the module global torch-pruning's graph.py calls through (not thread-safe); without that
    global (another torch-pruning version) it is a no-op and only slower.
    """
    tp_graph = getattr(tp.dependency, "graph", None)
    real = getattr(tp_graph, "index_mapping", None)
    if real is None or not hasattr(real, "update_index_mapping"):
        yield
        return
    with _channel_reshapes_unmapped():
        real.update_index_mapping(graph)
    tp_graph.index_mapping = types.SimpleNamespace(update_index_mapping=lambda _graph: None)
    try:
        yield
    finally:
        tp_graph.index_mapping = real


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels and m.out_channels > 1


@dataclass(frozen=True)
class _FixedChannels:
    """Where channel counts are pinned: autograd nodes producing model outputs, graph nodes reading the
    input, autograd nodes of reshapes that move channels across dimensions."""

    output_fns: set
    input_readers: set
    channel_reshapes: set


def _collect_groups(module, graph, specs, calls, fixed: _FixedChannels):
    names = {m: n for n, m in module.named_modules()}
    order = {m: i for i, m in enumerate(names)}
    layers, roots, groups, skipped, visited = [], {}, {}, [], set()
    candidates = sorted((m for m in graph.module2node if isinstance(m, _ROOT_TYPES) and m in names), key=order.get)
    with frozen_index_mapping(graph):  # nothing is pruned while grouping
        for m in candidates:
            if m in visited or names[m] not in specs:
                continue
            try:
                group = graph.get_pruning_group(m, out_pruning_fn(m), list(range(specs[names[m]].out_channels)))
            except Exception as exc:  # an op torch-pruning cannot index through
                skipped.append(SkippedLayer(names[m], f"torch-pruning could not group it ({first_line(exc)})"))
                visited.add(m)
                continue
            outs, ins = _members(graph, group)
            visited.update(outs)
            root = _pick_root(outs, order)
            layer = _describe(root, outs, ins, names, order, specs, calls, graph, fixed)
            layers.append(layer)
            roots[layer.name], groups[layer.name] = root, group
    layers.sort(key=lambda layer: order[roots[layer.name]])
    skipped += _unhandled(module, visited, graph, calls)
    return layers, roots, groups, skipped


def _members(graph, group) -> tuple[list, list]:
    """Split a group: modules whose output channels shrink, modules whose input channels shrink."""
    outs, ins = [], []
    for item in group:
        m = item.dep.target.module
        (outs if graph.is_out_channel_pruning_fn(item.dep.handler) else ins).append(m)
    return outs, ins


def _pick_root(outs: list, order: dict) -> nn.Module:
    candidates = [m for m in outs if isinstance(m, _ROOT_TYPES) and m in order]
    return min(candidates, key=lambda m: (_is_depthwise(m), order[m]))


def _layer_names(modules, names, order) -> tuple[str, ...]:
    named = {m for m in modules if isinstance(m, _ROOT_TYPES) and m in names}
    return tuple(names[m] for m in sorted(named, key=order.__getitem__))


def _describe(root, outs, ins, names, order, specs, calls, graph, fixed) -> PrunableLayer:
    name = names[root]
    spec = specs[name]
    coupled = _layer_names([m for m in outs if m is not root], names, order)
    consumers = _layer_names(ins, names, order)
    step = _channel_step(graph, outs + ins)
    reason = _why_not_prunable(graph, outs, ins, names, calls, fixed, spec.out_channels, step)
    return PrunableLayer(name, spec.type, spec.out_channels, spec.in_channels, spec.kernel_size, spec.stride,
                         spec.groups, spec.input_hw, coupled, consumers, step, not reason, reason)


def _channel_step(graph, modules) -> int:
    """Grouped convs (and GroupNorm) split channels into blocks that must stay equal in size; torch-pruning
    keeps the same positions in every block. lcm over the group so every member's blocks line up."""
    step = 1
    for m in modules:
        if _is_depthwise(m) or not isinstance(m, nn.Module):
            continue
        pruner = graph.get_pruner_of_module(m)
        for fn in ("get_out_channel_groups", "get_in_channel_groups"):
            if hasattr(pruner, fn):
                step = math.lcm(step, int(getattr(pruner, fn)(m)))
    return step


def _label(m, node, names) -> str:
    if m in names:
        return names[m]
    return node.grad_fn.name() if node is not None and hasattr(node.grad_fn, "name") else type(m).__name__


def _keeps_channels(m: nn.Module) -> bool:
    """Ops whose output channels are their input channels (BN, depthwise, add, concat...), unlike a
    dense conv/linear, whose input channels do not change when its outputs are pruned."""
    return _is_depthwise(m) or not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))


def _why_not_prunable(graph, outs, ins, names, calls, fixed: _FixedChannels, width, step) -> str:
    out_set = set(outs)  # by identity: members can be Parameters (layer scales), whose == is element-wise
    for m in outs + ins:
        node = graph.module2node.get(m)
        if node is not None and node.type == tp.ops.OPTYPE.OUTPUT:
            return "its channels are the model output"
        if m in out_set and node is not None and node.grad_fn in fixed.output_fns:
            return f"its output is the model output ({_label(m, node, names)})"
        if calls.get(m, 0) > 1:
            return f"{_label(m, node, names)} runs {calls[m]} times per forward (shared weights)"
        if m in out_set and _keeps_channels(m) and node is not None and (node in fixed.input_readers or
                                                                         (_is_depthwise(m) and not node.inputs)):
            return f"{_label(m, node, names)} reads the model input, whose channels are fixed"
        if node is not None and node.grad_fn in fixed.channel_reshapes:
            return (f"its channels pass through {_label(m, node, names)}, a reshape that moves channels across "
                    "dimensions (e.g. a channel shuffle), which torch-pruning cannot map channel indices through")
    if width <= step:
        return f"{width} channels in {step} channel groups: it cannot shrink"
    return ""


def _unhandled(module, visited, graph, calls) -> list[SkippedLayer]:
    out = []
    for name, m in module.named_modules():
        if m in visited or not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        if not isinstance(m, _ROOT_TYPES):
            reason = f"{type(m).__name__} is not pruned (only Conv1d/2d/3d and Linear output channels)"
        elif m not in graph.module2node or not calls.get(m):
            reason = "not used in the forward pass with the example input"
        else:
            reason = "torch-pruning put it in no pruning group"
        out.append(SkippedLayer(name, reason))
    return out
