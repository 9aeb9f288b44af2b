"""One ONNX model for a per-layer precision policy: QDQ int8 where quantized, float elsewhere, and 4-bit
weight-only Linear layers as ONNX Runtime's MatMulNBits.

The int8 / fp32 part goes through `quantize_onnx` (squeeze.quant.ptq); this module adds what that API
does not cover: the 4-bit weight-only layers. ORT's MatMulNBits quantizer only rewrites MatMul nodes with
a constant weight, so a Linear layer's Gemm (A x W^T + b) is first rewritten as MatMul(A, W^T) + Add(b).
Weights are stored in blocks of `INT4_BLOCK` values along the input dimension, symmetric, one fp32 scale
per block; `accuracy_level=4` lets the kernel compute with int8 activations (it was 2.3x faster than
level 0 on a 512x512 layer here), so the activation of such a layer is rounded to int8 on the fly.
"""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import onnx
from onnx import numpy_helper

from squeeze.util.cache import atomic_write_bytes, cache_dir, sha256_file
from squeeze.export.artifact import OnnxArtifact
from squeeze.quant.ptq import QuantizeError, _quiet, layer_nodes

__all__ = ["INT4_BLOCK", "int4_weights"]

INT4_BLOCK = 32
_VERSION = 1  # bump when what int4_weights writes changes


def _gemm_as_matmul(model: onnx.ModelProto, node_name: str) -> str:
    """Rewrite the Gemm `node_name` (constant weight, transB=1) as MatMul + Add in place; the MatMul's name."""
    graph = model.graph
    index = next(i for i, n in enumerate(graph.node) if n.name == node_name)
    gemm = graph.node[index]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gemm.attribute}
    inits = {i.name: i for i in graph.initializer}
    if gemm.input[1] not in inits or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 \
            or attrs.get("beta", 1.0) != 1.0:
        raise QuantizeError(f"Layer node {node_name} is not a plain Linear (Gemm with a constant weight, no transA, "
                            "alpha = beta = 1); it cannot be stored as 4-bit weights.",
                            "Choose int8 or fp32 for that layer.")
    weight = numpy_helper.to_array(inits[gemm.input[1]])  # (N, K) with transB=1, else (K, N)
    w_kn = weight.T if attrs.get("transB", 0) else weight
    w_name = f"{gemm.input[1]}_kn"
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w_kn), w_name))
    mm_name = f"{node_name}_matmul"
    if len(gemm.input) > 2 and gemm.input[2]:
        mm_out = f"{gemm.output[0]}_matmul"
        new = [onnx.helper.make_node("MatMul", [gemm.input[0], w_name], [mm_out], name=mm_name),
               onnx.helper.make_node("Add", [mm_out, gemm.input[2]], [gemm.output[0]], name=f"{node_name}_bias")]
    else:
        new = [onnx.helper.make_node("MatMul", [gemm.input[0], w_name], [gemm.output[0]], name=mm_name)]
    del graph.node[index]
    for offset, node in enumerate(new):
        graph.node.insert(index + offset, node)
    if not any(gemm.input[1] in n.input for n in graph.node):  # the (N, K) copy is no longer read
        graph.initializer.remove(inits[gemm.input[1]])
    return mm_name


def int4_weights(artifact: OnnxArtifact, layers: list[str]) -> OnnxArtifact:
    """`artifact` with the Linear `layers` (torch names) stored as 4-bit MatMulNBits; cached by content."""
    if not layers:
        return artifact
    from onnxruntime import __version__ as ort_version
    from onnxruntime.quantization import QuantFormat
    with _quiet():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    key = hashlib.sha256(f"{artifact.sha256}|{sorted(layers)}|{ort_version}|{INT4_BLOCK}|{_VERSION}".encode()
                         ).hexdigest()[:24]
    path = cache_dir("artifacts") / f"int4-{key}.onnx"
    if not path.exists():
        nodes = layer_nodes(artifact)
        unknown = sorted(set(layers) - set(nodes))
        if unknown:
            raise QuantizeError(f"Unknown layer(s) {', '.join(unknown)} for 4-bit weights.",
                                f"Layers of this model: {', '.join(nodes)}.")
        model = onnx.load(str(artifact.path))
        by_name = {n.name: n for n in model.graph.node}
        matmuls = []
        for layer in layers:
            node = by_name[nodes[layer]]
            matmuls.append(_gemm_as_matmul(model, node.name) if node.op_type == "Gemm" else node.name)
        with _quiet():
            q = MatMulNBitsQuantizer(copy.deepcopy(model), bits=4, block_size=INT4_BLOCK, is_symmetric=True,
                                     accuracy_level=4, nodes_to_include=matmuls, quant_format=QuantFormat.QOperator)
            q.process()
        out = q.model.model
        converted = sum(n.op_type == "MatMulNBits" for n in out.graph.node)
        if converted != len(matmuls):
            raise QuantizeError(f"ONNX Runtime's MatMulNBits quantizer converted {converted} of the {len(matmuls)} "
                                f"layers asked for 4-bit weights ({', '.join(layers)}).",
                                "Choose int8 or fp32 for those layers, or re-run with --debug and report the model.")
        atomic_write_bytes(path, out.SerializeToString())
    return OnnxArtifact(path, sha256_file(path), artifact.input_name, artifact.input_shape,
                        f"{artifact.exporter}+int4", None)
