"""Post-training quantization of an exported ONNX model: int8 QDQ through ONNX Runtime's tooling, and fp16.

The export API other passes build on (HAQ, QAT):

    layer_nodes(artifact) -> {torch layer name: ONNX node name}
        Every Conv / Gemm / MatMul node with a weight initializer, named after the torch module that owns
        the weight: `conv1.0.weight` -> `conv1.0` (dynamo export), `/conv1/conv1.0/Conv` -> `conv1.0`
        (TorchScript export, where folded weights lose their names).

    quantize_onnx(artifact, calibration, config) -> OnnxArtifact
        `quant_pre_process` (shape inference + graph optimization), then `quantize_static` in QDQ format
        with `config`'s types, per-channel weights and calibration method, calibrated on `calibration`.
        Layers named in `config.exclude` (or `per_layer[name] == "fp32"`) stay float through
        `nodes_to_exclude`; `per_layer[name] == "int16"` quantizes that layer's weight and input
        activation to 16 bits through `TensorQuantOverrides`. The produced graph is checked: every layer
        meant to be quantized reads its input and weight from DequantizeLinear nodes, every excluded one
        reads float tensors (else ExportError). The result is cached by content (source artifact hash,
        calibration samples hash, config, onnxruntime version), so measuring it uses the measurement
        cache like any other artifact. Its `parity` is None: a quantized model is not equal to its source
        within a float tolerance; `compare_outputs` gives its top-1 agreement and SNR instead.

Calibration ranges depend only on the pre-processed model, the samples and the method, so they are
computed once and reused (ORT's calibration cache) by every config quantized from the same inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import BaseModel, ConfigDict, Field

from squeeze.util.cache import atomic_write_bytes, cache_dir, sha256_file
from squeeze.errors import SqueezeError, first_line
from squeeze.export.artifact import OnnxArtifact
from squeeze.quant.calibrate import (
    CalibrationData,
    CalibrationMethodName,
    calibration_method,
    compute_ranges,
)

__all__ = ["QuantConfig", "LayerPrecision", "QuantizeError", "OutputParity", "layer_nodes", "quantize_onnx",
           "layer_precisions", "op_counts", "to_fp16", "compare_outputs", "LAYER_OPS"]

LAYER_OPS = ("Conv", "Gemm", "MatMul")
LayerPrecision = Literal["fp32", "int8", "int16"]
_QUANT_VERSION = 1  # bump when the quantization recipe below changes what it writes


class QuantizeError(SqueezeError):
    """A quantization request that cannot be carried out (unknown layers, an unquantizable graph)."""


class QuantConfig(BaseModel):
    """How to quantize one model. Layer names are torch module names (see `layer_nodes`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    # 7-bit weights ([-64, 64] / [0, 127]): x86 u8s8 kernels without VNNI sum products pairwise in 16 bits,
    # which 8-bit weights can saturate and 7-bit ones cannot.
    reduce_range: bool = False
    calibration: CalibrationMethodName = "minmax"
    exclude: list[str] = Field(default_factory=list, description="layers left in float")
    per_layer: dict[str, LayerPrecision] = Field(default_factory=dict, description="layer -> fp32|int8|int16")

    def float_layers(self) -> set[str]:
        return set(self.exclude) | {name for name, p in self.per_layer.items() if p == "fp32"}

    def label(self) -> str:
        return f"a:{self.activation_type} w:{self.weight_type}{' 7-bit' if self.reduce_range else ''}"


# ---------------------------------------------------------------------------------------------------
# Torch layer names of ONNX nodes.


def _weight_input(node: onnx.NodeProto, inits: set[str], dq_sources: dict[str, str]) -> str | None:
    """The node's weight initializer; in a quantized graph, the float name behind its DequantizeLinear."""
    candidates = node.input[1:2] if node.op_type in ("Conv", "Gemm") else node.input  # MatMul: either side
    for name in candidates:
        if name in inits:
            return name
        if name in dq_sources:
            return dq_sources[name]
    return None


_NAMESPACE_MODULE = re.compile(r"/([^/:]+): torch\.nn\.modules\.[\w.]+$")


def _scope_path(scopes: list[str]) -> str:
    """TorchScript scopes -> module path: `stages/stages.0/stages.0.0/conv1/conv1.0` -> `stages.0.0.conv1.0`.
    A container's child repeats the container's name (`stages.0` under `stages`); others are attributes."""
    path, local = "", ""
    for scope in scopes:
        if local and scope.startswith(local + "."):
            path += scope[len(local):]
        else:
            path = f"{path}.{scope}" if path else scope
        local = scope
    return path


def _layer_name(node: onnx.NodeProto, weight: str) -> str:
    if weight.endswith(".weight"):  # dynamo keeps parameter names: conv1.0.weight
        return weight[: -len(".weight")]
    scopes = node.name.strip("/").split("/")
    if node.name.startswith("/") and len(scopes) >= 2:  # TorchScript scope path: /conv1/conv1.0/Conv
        return _scope_path(scopes[:-1])
    for prop in node.metadata_props:  # dynamo module scope: ".../conv1.0: torch.nn.modules.conv.Conv2d/..."
        if prop.key == "namespace":
            owner = prop.value.rsplit("/", 1)[0]
            m = _NAMESPACE_MODULE.search(owner)
            if m:
                return m.group(1)
    return node.name


def _layer_nodes(model: onnx.ModelProto) -> dict[str, str]:
    inits = {i.name for i in model.graph.initializer}
    # DequantizeLinear of a quantized initializer -> the float weight's name (`conv1.0.weight_quantized`).
    dq_sources = {n.output[0]: n.input[0].removesuffix("_quantized") for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    found: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type in LAYER_OPS:
            weight = _weight_input(node, inits, dq_sources)
            if weight is not None:
                found.setdefault(_layer_name(node, weight), node.name)
    return found


def layer_nodes(artifact: OnnxArtifact) -> dict[str, str]:
    """{torch layer name: ONNX node name} for every Conv/Gemm/MatMul with a weight, in graph order."""
    return _layer_nodes(onnx.load(str(artifact.path)))


# ---------------------------------------------------------------------------------------------------
# The quantized graph: which layers read quantized tensors, and op counts.


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in graph.node for out in n.output}


def layer_precisions(model: onnx.ModelProto | str | Path, nodes: dict[str, str] | None = None) -> dict[str, str]:
    """Per layer, the precision its weight is stored in: the quantized element type ("int8", "uint8",
    "int16", ...) when the weight comes from a DequantizeLinear, else "fp32". A quantized weight whose
    activation input is not quantized too is "partial" (ORT then computes that layer in float)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    nodes = _layer_nodes(model) if nodes is None else nodes
    producers = _producers(graph)
    init_types = {i.name: i.data_type for i in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    result = {}
    for layer, node_name in nodes.items():
        node = by_name[node_name]
        act, weight = (producers.get(i) for i in node.input[:2])
        if weight is None or weight.op_type != "DequantizeLinear":
            result[layer] = "fp32"
        elif act is None or act.op_type != "DequantizeLinear":
            result[layer] = "partial"
        else:
            result[layer] = onnx.helper.tensor_dtype_to_np_dtype(init_types[weight.input[0]]).name
    return result


def op_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------------
# quantize_onnx.


@contextlib.contextmanager
def _quiet():
    """ORT's quantization tooling logs warnings and prints, and one of its modules calls logging.basicConfig on
    import (a root handler at INFO, which would print every later log line twice): keep the CLI's output clean."""
    sink = io.StringIO()
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def _preprocessed(artifact: OnnxArtifact) -> Path:
    """`quant_pre_process` output of the artifact, cached by its hash."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = cache_dir("quant") / f"pre-{artifact.sha256[:24]}-{_ort_version()}.onnx"
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp, _quiet():
            out = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(artifact.path), str(out))
            except Exception as exc:  # ORT's shape inference / optimizer raise many types
                raise QuantizeError(f"ONNX Runtime's quantization pre-processing failed on {artifact.path} "
                                    f"({first_line(exc)}).", "Re-run with --debug for the trace.") from exc
            os.replace(out, path)
    return path


def _overrides(model: onnx.ModelProto, nodes: dict[str, str], config: QuantConfig,
               ranges: dict[str, tuple[float, int]]) -> dict[str, list[dict]]:
    """TensorQuantOverrides: fixed (scale, zero point) of the given activations; for 16-bit layers, the
    weight (per channel when asked) and the input activation."""
    from onnxruntime.quantization import QuantType

    act_dtype = np.uint8 if config.activation_type == "uint8" else np.int8
    fixed = {name: [{"scale": np.array(scale, np.float32), "zero_point": np.array(zero_point, act_dtype)}]
             for name, (scale, zero_point) in ranges.items()}

    by_name = {n.name: n for n in model.graph.node}
    act16 = QuantType.QUInt16 if config.activation_type == "uint8" else QuantType.QInt16
    overrides: dict[str, list[dict]] = {}
    for layer, precision in config.per_layer.items():
        if precision != "int16":
            continue
        node = by_name[nodes[layer]]
        weight = {"quant_type": QuantType.QInt16}
        if config.per_channel and node.op_type == "Conv":
            weight["axis"] = 0  # (C_out, C_in/groups, kH, kW): one scale per output channel
        overrides[node.input[1]] = [weight]
        overrides[node.input[0]] = [{"quant_type": act16}]
    return {**fixed, **overrides}


def _check_layers(config: QuantConfig, nodes: dict[str, str]) -> None:
    unknown = sorted((set(config.exclude) | set(config.per_layer)) - set(nodes))
    if unknown:
        raise QuantizeError(f"Unknown layer(s) {', '.join(unknown)} in the quantization config.",
                            f"Layers of this model: {', '.join(nodes)}.")


def _cache_key(artifact: OnnxArtifact, calibration: CalibrationData, config: QuantConfig,
               ranges: dict[str, tuple[float, int]] | None) -> str:
    text = (f"{artifact.sha256}|{calibration.fingerprint}|{config.model_dump_json()}|{_ort_version()}|{_QUANT_VERSION}"
            f"|{sorted((ranges or {}).items())}")
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _calibration_cache(pre: Path, calibration: CalibrationData, method: str) -> Path:
    key = hashlib.sha256(f"{sha256_file(pre)}|{calibration.fingerprint}|{method}".encode()).hexdigest()[:24]
    return cache_dir("quant") / f"calib-{key}.json"


def _verify(quantized: onnx.ModelProto, nodes: dict[str, str], config: QuantConfig) -> dict[str, str]:
    """The graph does what the config asked: float layers keep float weights, the others read quantized
    weights and activations."""
    precisions = layer_precisions(quantized, nodes)
    floats = config.float_layers()
    wrong = {layer: p for layer, p in precisions.items() if (p == "fp32") != (layer in floats)}
    if wrong:
        listed = ", ".join(f"{layer} ({p}, asked {'fp32' if layer in floats else 'quantized'})"
                           for layer, p in wrong.items())
        raise QuantizeError(f"ONNX Runtime's quantizer did not produce the asked precision for: {listed}.",
                            "Exclude those layers (they stay float), or re-run with --debug and report the model.")
    return precisions


_memo: dict[str, OnnxArtifact] = {}


def quantize_onnx(artifact: OnnxArtifact, calibration: CalibrationData, config: QuantConfig, *,
                  activation_ranges: dict[str, tuple[float, int]] | None = None) -> OnnxArtifact:
    """`artifact` quantized to QDQ as `config` says, calibrated on `calibration`; cached (see module doc).

    `activation_ranges` fixes the (scale, zero point) of named activation tensors instead of calibrating
    them (QAT's learned ranges), through TensorQuantOverrides.
    """
    key = _cache_key(artifact, calibration, config, activation_ranges)
    if key in _memo:
        return _memo[key]
    folder = cache_dir("artifacts")
    path, meta_path = folder / f"q-{key}.onnx", folder / f"q-{key}.json"
    if not (path.exists() and meta_path.exists()):
        _quantize(artifact, calibration, config, activation_ranges or {}, path, meta_path)
    meta = json.loads(meta_path.read_text())
    art = OnnxArtifact(path, sha256_file(path), meta["input_name"], tuple(meta["input_shape"]), meta["exporter"], None)
    _memo[key] = art
    return art


def _quantize(artifact: OnnxArtifact, calibration: CalibrationData, config: QuantConfig,
              ranges_override: dict[str, tuple[float, int]], path: Path, meta_path: Path) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    pre = _preprocessed(artifact)
    model = onnx.load(str(pre))
    nodes = _layer_nodes(model)
    _check_layers(config, nodes)
    if not nodes:
        raise QuantizeError(f"{artifact.path} has no Conv, Gemm or MatMul layer with weights to quantize.")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    ranges = _calibration_cache(pre, calibration, config.calibration)
    with _quiet():
        if not ranges.exists():
            compute_ranges(pre, calibration, config.calibration, artifact.input_name, ranges)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp, _quiet():
        out = Path(tmp) / "q.onnx"
        try:
            quantize_static(
                str(pre), str(out), quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
                reduce_range=config.reduce_range,
                activation_type=types[config.activation_type], weight_type=types[config.weight_type],
                nodes_to_exclude=[nodes[layer] for layer in sorted(config.float_layers())],
                calibrate_method=calibration_method(config.calibration), calibration_cache_path=str(ranges),
                extra_options={"TensorQuantOverrides": _overrides(model, nodes, config, ranges_override)},
            )
        except SqueezeError:
            raise
        except Exception as exc:  # ORT's quantizer raises many types
            raise QuantizeError(f"ONNX Runtime's quantize_static failed ({first_line(exc)}) for {config.label()}, "
                                f"{config.calibration} calibration.", "Re-run with --debug for the trace.") from exc
        quantized = onnx.load(str(out))
        precisions = _verify(quantized, nodes, config)
        atomic_write_bytes(path, out.read_bytes())
    meta = {"input_name": artifact.input_name, "input_shape": list(artifact.input_shape),
            "exporter": f"{artifact.exporter}+qdq", "source_sha256": artifact.sha256, "config": config.model_dump(),
            "calibration": calibration.to_json(), "layers": precisions}
    atomic_write_bytes(meta_path, json.dumps(meta).encode())


# ---------------------------------------------------------------------------------------------------
# fp16.


def to_fp16(artifact: OnnxArtifact) -> OnnxArtifact:
    """Weights and compute in float16, float32 input and output (Cast at the edges); cached by content."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    key = hashlib.sha256(f"{artifact.sha256}|fp16|{_ort_version()}|{_QUANT_VERSION}".encode()).hexdigest()[:24]
    path = cache_dir("artifacts") / f"fp16-{key}.onnx"
    if not path.exists():
        with _quiet():
            model = convert_float_to_float16(onnx.load(str(artifact.path)), keep_io_types=True)
        atomic_write_bytes(path, model.SerializeToString())
    return OnnxArtifact(path, sha256_file(path), artifact.input_name, artifact.input_shape,
                        f"{artifact.exporter}+fp16", None)


# ---------------------------------------------------------------------------------------------------
# Parity of a quantized model with its float source.


@dataclass(frozen=True)
class OutputParity:
    """Outputs of a model vs a reference on the same inputs."""

    n: int
    top1_agreement: float  # fraction of samples whose arg-max class is the same
    snr_db: float  # 10 log10(sum ref^2 / sum (out - ref)^2); inf when equal
    max_abs_err: float

    def to_json(self) -> dict:
        return asdict(self)


def compare_outputs(reference: np.ndarray, outputs: np.ndarray) -> OutputParity:
    """Top-1 agreement and signal-to-noise ratio of `outputs` (N, K) against `reference` (N, K)."""
    reference, outputs = np.asarray(reference, np.float64), np.asarray(outputs, np.float64)
    noise = float(np.sum((outputs - reference) ** 2))
    signal = float(np.sum(reference ** 2))
    snr = float("inf") if noise == 0 else 10 * np.log10(signal / noise) if signal > 0 else float("-inf")
    agree = float(np.mean(reference.argmax(axis=1) == outputs.argmax(axis=1)))
    return OutputParity(len(reference), agree, snr, float(np.abs(outputs - reference).max()))
