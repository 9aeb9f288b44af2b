"""Per-layer time from ONNX Runtime's profiler, mapped back to torch layers.

ORT fuses Conv+BN+Relu(+Add), converts QDQ groups into QLinearConv / QGemm, and renames nodes (`..._nchwc`,
`..._token_3`), so profile events cannot be matched to layers by node name. They are matched through the
weights: a node that reads a layer's weight or bias initializer (`conv1.0.weight`, or its quantized
`conv1.0.weight_quantized`, directly or through a DequantizeLinear when ORT could not fuse the QDQ group
and runs a float Conv on dequantized weights) is that layer; so is a BatchNormalization node reading the initializers of
an unfolded BN layer (pre-activation nets, which lookup tables price per BN). Where ORT re-laid a weight out (NCHWc
`reorder` initializers) and the layer has no bias to recognize it by, the remaining layer nodes are matched in graph
order. TorchScript's export shares equal initializers between layers (the zero biases of BNs folded at init, through
Identity nodes): `distinct_initializers` gives each layer its own copy first, so that each stays recognizable.
Nodes that are not layers (QuantizeLinear, Transpose, pooling, Add, ...) are charged to the layer whose
output they consume, or, before the first layer, to the layer they feed: a quantized layer pays for the
conversions it causes.

Profiling itself slows a run about 2x, so these figures only rank layers against each other; end-to-end
latency is always measured with profiling off, through squeeze.measure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from squeeze.export.artifact import OnnxArtifact
from squeeze.export.ort import open_session
from squeeze.measure.protocol import Protocol
from squeeze.measure.runtimes import seeded_input
from squeeze.quant.ptq import LAYER_OPS, _layer_name, _layer_nodes, _scope_path

__all__ = ["PAIRING", "LayerProfile", "distinct_initializers", "layer_consumers", "layer_identities", "profile_artifacts",
           "profile_layers", "profiler_overhead_us", "slower_layers"]

# Bumped whenever the mapping of kernels to layers changes: times stored under another one were charged to
# other layers (2: re-laid-out kernels paired by scope, not by node order; 3: no spinning workers, whose
# cores the next session's first layer paid for; 4: each node's time less the profiler's own; 5: scopes matched
# past containers that write none, which had shifted DenseNet's 3x3 convs and batch norms by one layer; 6: a lone
# model profiled with spinning workers, see NO_SPINNING).
PAIRING = 6
_LAYER_KERNELS = {"Conv", "FusedConv", "QLinearConv", "Gemm", "FusedGemm", "QGemm", "MatMul", "FusedMatMul",
                  "QLinearMatMul", "MatMulInteger", "ConvInteger", "NhwcFusedConv"}
_NORM_KERNELS = {"BatchNormalization"}  # matched by their initializers only, never in graph order
# Profiling sessions each have their own pool (a profile needs one): interleaved, the workers of the session run
# last would spin on the cores the next one's first layer needs (ShuffleNet's stem conv read 0.25-5.9 ms). A lone
# model is profiled with spinning workers, as it runs: without, each multi-threaded kernel pays its workers'
# wake-up, which does not shrink with the kernel; on a 2-core EPYC a pruned MobileNetV2 profiled 0.57x the
# original that way and 0.435x with spinning, and measured 0.43x.
NO_SPINNING = {"session.intra_op.allow_spinning": "0"}
_QUANT_SUFFIXES = ("_quantized", "_scale", "_zero_point")


@dataclass(frozen=True)
class LayerProfile:
    """Microseconds per torch layer (its kernels plus the conversions charged to it) in each profiled run."""

    layer_runs_us: dict[str, list[float]]
    other_us: float  # median per run of the nodes that could not be charged to any layer
    runs: int

    @property
    def layer_us(self) -> dict[str, float]:
        """Median per run."""
        return {layer: float(np.median(v)) for layer, v in self.layer_runs_us.items()}

    @property
    def total_us(self) -> float:
        return sum(self.layer_us.values()) + self.other_us


def layer_identities(model: onnx.ModelProto, norms: bool = False) -> dict[str, set[str]]:
    """{layer: names of its weight and bias initializers} in a float model; with `norms`, also the unfolded
    BatchNormalization layers."""
    inits = {i.name for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    found = {layer: {i for i in by_name[node].input[1:] if i in inits} for layer, node in _layer_nodes(model).items()}
    if norms:
        for node in model.graph.node:
            if node.op_type in _NORM_KERNELS and node.input[1] in inits:
                found.setdefault(_layer_name(node, node.input[1]), {i for i in node.input[1:] if i in inits})
    return found


def layer_consumers(model: onnx.ModelProto) -> dict[str, set[str]]:
    """{layer: the layers that read its output, through any nodes that are not layers} in a float model."""
    model = distinct_initializers(model)
    graph = model.graph
    node_layer = _node_layers(graph, layer_identities(model, norms=True))
    layer_nodes = {n.name for n in graph.node if n.op_type in _LAYER_KERNELS | _NORM_KERNELS and n.name in node_layer}
    readers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            readers[i].append(n)
    found: dict[str, set[str]] = defaultdict(set)
    for node in graph.node:
        if node.name not in layer_nodes:
            continue
        seen, frontier = set(), [r for o in node.output for r in readers[o]]
        while frontier:
            current = frontier.pop()
            if current.name in seen:
                continue
            seen.add(current.name)
            if current.name in layer_nodes:
                found[node_layer[node.name]].add(node_layer[current.name])
            else:
                frontier.extend(r for o in current.output for r in readers[o])
    return dict(found)


def distinct_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where every layer node (Conv, Gemm, MatMul, BatchNormalization) reads initializers of
    its own: a shared one (directly or through an Identity node) is copied per extra reader."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    aliases = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    taken: set[str] = set()
    for node in graph.node:
        if node.op_type not in (*LAYER_OPS, *_NORM_KERNELS):
            continue
        for j, name in enumerate(node.input):
            source = aliases.get(name, name)
            if source not in inits:
                continue
            if source in taken:
                copy = onnx.TensorProto.FromString(inits[source].SerializeToString())
                copy.name = f"{source}/{node.name}"
                graph.initializer.append(copy)
                source = copy.name
            node.input[j] = source
            taken.add(source)
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unread = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in read]
    for n in unread:
        graph.node.remove(n)
    return model


def _strip(name: str) -> str:
    """`conv1.0.weight_bias_quantized_scale` -> `conv1.0.weight_bias`."""
    stripped = None
    while stripped != name:
        stripped, name = name, name
        for suffix in _QUANT_SUFFIXES:
            name = name.removesuffix(suffix)
    return name


def _shared(path: list[str], layer: str) -> int:
    """How many parts of its dotted name, from the top, a layer shares with the module path of a node's scopes
    (squeeze.quant.ptq._scope_path: DenseNet's `features.4.layers.0.1.2` runs under
    features/features.4/layers.0/layers.0.1/layers.0.1.2, its ModuleList `layers`, never called, without a
    scope)."""
    a, b = _scope_path(path).split("."), layer.split(".")
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _pair_by_scope(nodes: list[str], layers: list[str]) -> dict[str, str]:
    """Kernels whose weights ORT re-laid out, paired with the layers left: by the scope their names share
    (`/stage3/stage3.0/branch1/branch1.1/branch1.1.2/Relu_output_0_nchwc`, a conv fused up to its ReLU), the
    longest first. ORT's node order differs between sessions, so pairing in order swapped a ShuffleNet unit's
    two branches from one profile to the next; what no scope tells apart is still paired in order. Among them
    are batch norms ORT runs as blocked convs (`..._bn_nchwc`)."""
    shared = []
    for i, node in enumerate(nodes):
        path = node.split("/")[1:-1]
        shared += [(-_shared(path, layer), i, j) for j, layer in enumerate(layers)]
    paired, used_nodes, used_layers = {}, set(), set()
    for _, i, j in sorted(shared):
        if i not in used_nodes and j not in used_layers:
            paired[nodes[i]] = layers[j]
            used_nodes.add(i)
            used_layers.add(j)
    return paired


def _node_layers(graph: onnx.GraphProto, identities: dict[str, set[str]]) -> dict[str, str]:
    """Optimized-graph node name -> torch layer, for every node (see the module docstring)."""
    inits = {i.name for i in graph.initializer}
    owner = {name: layer for layer, names in identities.items() for name in names}
    producers = {out: n for n in graph.node for out in n.output}

    def constants(node) -> list[str]:
        """Initializers the node reads, directly or through a DequantizeLinear (a float Conv fed by a
        dequantized weight: what ORT runs when it cannot fuse a QDQ group)."""
        found = [i for i in node.input if i in inits]
        for i in node.input:
            p = producers.get(i)
            if p is not None and p.op_type == "DequantizeLinear":
                found += [j for j in p.input if j in inits]
        return found

    result: dict[str, str] = {}
    unmatched_nodes = []
    for node in graph.node:
        if node.op_type not in _LAYER_KERNELS | _NORM_KERNELS:
            continue
        names = constants(node)
        hits = {owner[_strip(i)] for i in names if _strip(i) in owner}
        if len(hits) == 1:
            result[node.name] = hits.pop()
        elif names and node.op_type in _LAYER_KERNELS:
            unmatched_nodes.append(node.name)
    unmatched_layers = [layer for layer in identities if layer not in set(result.values())]
    result.update(_pair_by_scope(unmatched_nodes, unmatched_layers))

    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)

    def search(node, step) -> str | None:
        seen, frontier = set(), [node]
        while frontier:
            current = frontier.pop(0)
            if current.name in result and current is not node:
                return result[current.name]
            if current.name in seen:
                continue
            seen.add(current.name)
            frontier.extend(step(current))
        return None

    upstream = lambda n: [producers[i] for i in n.input if i in producers]  # noqa: E731
    downstream = lambda n: [c for o in n.output for c in consumers[o]]  # noqa: E731
    for node in graph.node:
        if node.name not in result:
            layer = search(node, upstream) or search(node, downstream)
            if layer is not None:
                result[node.name] = layer
    return result


def _session(artifact: OnnxArtifact, providers: list[str], threads: int, folder: Path, tag: str, spinning: bool):
    import onnxruntime as ort

    return open_session(artifact, providers, config=None if spinning else NO_SPINNING,
                        intra_op_num_threads=threads,
                        execution_mode=ort.ExecutionMode.ORT_SEQUENTIAL,
                        graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                        enable_profiling=True, profile_file_prefix=str(folder / tag),
                        optimized_model_filepath=str(folder / f"{tag}-optimized.onnx"))


def _kernel_times(profile_path: str) -> dict[str, list[float]]:
    """Node name -> kernel microseconds of each run, from ORT's Chrome-trace profile."""
    times: dict[str, list[float]] = defaultdict(list)
    for event in json.loads(Path(profile_path).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["name"].removesuffix("_kernel_time")].append(float(event["dur"]))
    return times


def profile_layers(artifacts: list[OnnxArtifact], identities: dict[str, set[str]], providers: list[str],
                   protocol: Protocol, runs: int = 30, node_overhead_us: float = 0.0) -> list[LayerProfile]:
    """Profile the artifacts interleaved (one run of each per round, as squeeze.measure does) and return,
    for each, the microseconds per torch layer in each of the `runs` runs after `protocol.warmup`, each
    node's time less `node_overhead_us` (what the profiler adds to it: `profiler_overhead_us`)."""
    with tempfile.TemporaryDirectory(prefix="squeeze-profile-") as tmp:
        folder = Path(tmp)
        sessions = [_session(a, providers, protocol.threads, folder, f"m{i}", spinning=len(artifacts) == 1)
                    for i, a in enumerate(artifacts)]
        feeds = [{a.input_name: seeded_input(a, protocol)} for a in artifacts]
        warmup = max(protocol.warmup, 1)
        for _ in range(warmup + runs):
            for sess, feed in zip(sessions, feeds):
                sess.run(None, feed)
        profiles = []
        for i, sess in enumerate(sessions):
            times = _kernel_times(sess.end_profiling())
            graph = onnx.load(str(folder / f"m{i}-optimized.onnx")).graph
            node_layer = _node_layers(graph, identities)
            layer_runs: dict[str, np.ndarray] = {}
            other = np.zeros(runs)
            for node, durations in times.items():
                # each node runs once per run; warm-up runs dropped
                per_run = np.maximum(np.asarray(durations[-runs:]) - node_overhead_us, 0.0)
                if len(per_run) < runs:
                    continue  # a node that did not run every time (none in ORT's CPU kernels) is left out
                if node in node_layer:
                    layer = node_layer[node]
                    layer_runs[layer] = layer_runs.get(layer, np.zeros(runs)) + per_run
                else:
                    other += per_run
            profiles.append(LayerProfile({k: v.tolist() for k, v in layer_runs.items()}, float(np.median(other)),
                                         runs))
    return profiles


def profile_artifacts(artifacts: list[OnnxArtifact], providers: list[str], protocol: Protocol,
                      runs: int = 30, node_overhead_us: float = 0.0) -> list[LayerProfile]:
    """`profile_layers` of models that need not share a graph (a model and a pruned or re-parameterized version
    of it), each layer matched by the initializers of the float graphs, every layer node given its own first. A
    QDQ graph is matched through the float graph it was quantized from, whose names it keeps."""
    graphs = [distinct_initializers(onnx.load(str(a.path))) for a in artifacts]
    identities: dict[str, set[str]] = {}
    for graph in graphs:
        if not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.graph.node):
            for layer, names in layer_identities(graph, norms=True).items():
                identities.setdefault(layer, set()).update(names)
    with tempfile.TemporaryDirectory(prefix="squeeze-profiled-") as tmp:
        copies = []
        for i, (artifact, graph) in enumerate(zip(artifacts, graphs)):
            path = Path(tmp) / f"model{i}.onnx"
            onnx.save(graph, str(path))
            copies.append(dataclasses.replace(artifact, path=path))
        return profile_layers(copies, identities, providers, protocol, runs, node_overhead_us)


@functools.lru_cache(maxsize=None)
def profiler_overhead_us(providers: tuple[str, ...], threads: int, nodes: int = 200, runs: int = 50) -> float:
    """Microseconds that ORT's profiler adds to each node's kernel time: a chain of `nodes` Reshapes, each a
    metadata change, profiled and timed without the profiler. On a 2-core EPYC a Reshape took 0.5 us in a run
    and 6-7 us in a profile, so in a net of many small nodes (ShuffleNet's shuffles, EfficientNet's SE) the
    profile's shares overstate them."""
    from onnx import TensorProto, helper

    shape = [1, 16, 8, 8]
    shapes = [helper.make_tensor("flat", TensorProto.INT64, [2], [1, -1]),
              helper.make_tensor("image", TensorProto.INT64, [4], shape)]
    chain, previous = [], "x"
    for i in range(nodes):
        chain.append(helper.make_node("Reshape", [previous, ("flat", "image")[i % 2]], [f"t{i}"], name=f"reshape{i}"))
        previous = f"t{i}"
    graph = helper.make_graph(chain, "reshapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(previous, TensorProto.FLOAT, None)], shapes)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    feed = {"x": np.zeros(shape, np.float32)}
    import onnxruntime as ort

    plain = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the Reshapes stay, one node each
    timed = open_session(model, list(providers), intra_op_num_threads=threads, graph_optimization_level=plain)
    seconds = []
    for i in range(runs + 5):
        start = time.perf_counter()
        timed.run(None, feed)
        seconds.append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory(prefix="squeeze-profiler-") as tmp:
        profiled = open_session(model, list(providers), config=NO_SPINNING,
                                intra_op_num_threads=threads, graph_optimization_level=plain,
                                enable_profiling=True, profile_file_prefix=str(Path(tmp) / "chain"))
        for _ in range(runs + 5):
            profiled.run(None, feed)
        kernels = [t for node in _kernel_times(profiled.end_profiling()).values() for t in node[5:]]
    return max(float(np.median(kernels)) - 1e6 * float(np.median(seconds[5:])) / nodes, 0.0)


def slower_layers(reference: LayerProfile, candidate: LayerProfile, layers: list[str],
                  min_fraction: float = 0.8) -> list[tuple[str, float]]:
    """(layer, median extra microseconds) for the `layers` slower in `candidate` than in `reference`,
    slowest first.

    The profiles' runs were interleaved, so run i of both is a pair: a layer is slower when it took
    longer in at least `min_fraction` of the pairs. Per-node times of a few microseconds are noisy, and
    a median difference alone would blame layers that did not change.
    """
    found = []
    for layer in layers:
        ref, cand = reference.layer_runs_us.get(layer), candidate.layer_runs_us.get(layer)
        if ref is None or cand is None:
            continue
        diff = np.asarray(cand) - np.asarray(ref)
        if np.mean(diff > 0) >= min_fraction:
            found.append((layer, float(np.median(diff))))
    return sorted(found, key=lambda t: -t[1])
