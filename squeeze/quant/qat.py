"""Quantization-aware training's torch side: the fake-quant model of a QDQ graph, and its export back to the
same graph as PTQ. The method (`quant.qat`: plan, fine-tune, report) is squeeze.methods.quant.qat.

1. The precision plan (activation/weight types, layers left float) is decided as for `quant.int8`: by
   measuring on the target (squeeze.methods.quant.int8.plan_int8). Its PTQ graph names every quantized activation
   tensor with its calibrated (scale, zero point).
2. Those tensors are found in the torch model: batch norms are folded into their convolutions
   (torch.fx), then every FX node's output is compared with the ONNX tensor's values on a calibration
   batch (both compute the same function, so they agree to float tolerance). A fake-quant goes after
   each match, with the calibrated scale (learned during fine-tuning, LSQ-style, or kept), and the zero
   point fixed. Tensors sharing one scale in the ONNX graph (MaxPool's output shares its input's) share
   one fake-quant module.
3. Each quantized layer's weight gets the quantizer ORT applies at export: per output channel (or per
   tensor), symmetric over [-127, 127] for int8, asymmetric over [0, 255] for uint8 (squeeze.quant.fakequant,
   shared with HAQ). Rounding passes gradients straight through (STE); values clipped by the range get none.
4. Fine-tuning is squeeze.train.fine_tune, distilling from the fp32 model by default.
5. Export: the trained float weights are written into the fp32 ONNX graph (same initializer names,
   checked for parity with the trained model with fake-quant off), which is quantized by `quantize_onnx`
   with the plan's config and the trained activation ranges as TensorQuantOverrides: the same QDQ graph
   as PTQ, with trained weights and ranges. The report gives the parity of the torch fake-quant model
   with that ORT int8 model (top-1 agreement, SNR).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from contextlib import contextmanager

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from squeeze.util.cache import atomic_write_bytes, cache_dir, sha256_file
from squeeze.errors import ExportError, first_line
from squeeze.export.artifact import OnnxArtifact
from squeeze.export.onnx import check_parity
from squeeze.export.ort import open_session
from squeeze.quant.fakequant import WeightFakeQuant, round_ste
from squeeze.quant.ptq import (
    QuantConfig,
    QuantizeError,
    _layer_nodes,
    _preprocessed,
    quantize_onnx,
)

__all__ = ["FakeQuant", "quantized_activations", "QatModel", "build_qat_model", "export_qat"]

log = logging.getLogger("squeeze.quant")

_ACT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


class FakeQuant(nn.Module):
    """Per-tensor affine fake-quantization of activations: (clamp(round(x / s) + z, qmin, qmax) - z) * s.

    With `learn=True` the scale is trained; its gradient is scaled by 1 / sqrt(numel x qmax) as in LSQ
    (Esser et al., 2020), which keeps the scale's steps in proportion with the weights' steps.
    """

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int, learn: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn)
        self.register_buffer("zero_point", torch.tensor(float(zero_point)))
        self.qmin, self.qmax = qmin, qmax
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scale.clamp_min(1e-12)
        if self.scale.requires_grad:
            g = 1.0 / math.sqrt(x[0].numel() * self.qmax)
            s = s * g + (s - s * g).detach()  # value s, gradient scaled by g
        q = torch.clamp(round_ste(x / s + self.zero_point), self.qmin, self.qmax)
        return (q - self.zero_point) * s


# ---------------------------------------------------------------------------------------------------
# The quantized tensors of a QDQ graph, and where they are in the torch model.


def quantized_activations(model: onnx.ModelProto) -> dict[str, tuple[str, float, int]]:
    """Float tensor name -> (scale initializer name, scale, zero point) of every quantized activation.

    A graph output that ORT quantized is renamed `<name>_QuantizeLinear_Input`; the float name is returned.
    """
    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            name = node.input[0].removesuffix("_QuantizeLinear_Input")
            scale = float(numpy_helper.to_array(inits[node.input[1]]))
            zero_point = int(numpy_helper.to_array(inits[node.input[2]]))
            found[name] = (node.input[1], scale, zero_point)
    return found


def _onnx_values(fp32: OnnxArtifact, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """Values of the named tensors of the (pre-processed) fp32 graph on input x."""
    model = onnx.load(str(_preprocessed(fp32)))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    outputs = open_session(model.SerializeToString()).run(names, {fp32.input_name: x})
    return dict(zip(names, outputs))


def _fx_values(gm: torch.fx.GraphModule, x: torch.Tensor) -> dict[str, torch.Tensor]:
    values: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                values[n.name] = out.detach()
            return out

    with torch.no_grad():
        Recorder(gm).run(x)
    return values


def _match(onnx_values: dict[str, np.ndarray], fx_values: dict[str, torch.Tensor],
           order: list[str]) -> dict[str, str]:
    """ONNX tensor -> the first FX node (graph order) with equal values: later nodes computing the same
    values (views, identities) then read the fake-quantized one."""
    mapping = {}
    for name, ref in onnx_values.items():
        tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        hit = next((n for n in order if n in fx_values and tuple(fx_values[n].shape) == ref.shape
                    and np.allclose(fx_values[n].numpy(), ref, atol=tol, rtol=1e-3)), None)
        if hit is None:
            raise QuantizeError(f"QAT could not find the quantized activation `{name}` of the ONNX graph in the torch "
                                "model (no FX node computes the same values).",
                                "Use --method int8 for this model, or report it with --debug.")
        mapping[name] = hit
    return mapping


class QatModel:
    """The fake-quant GraphModule and what export needs: which fake-quant serves which ONNX tensors."""

    def __init__(self, gm: torch.fx.GraphModule, tensor_fq: dict[str, str], owners: dict[str, str]) -> None:
        self.module = gm
        self.tensor_fq = tensor_fq  # ONNX tensor -> fake-quant submodule name
        self.owners = owners  # fake-quant submodule -> the ONNX tensor its range is set on at export

    def fake_quants(self) -> list[nn.Module]:
        return [m for m in self.module.modules() if isinstance(m, (FakeQuant, WeightFakeQuant))]

    @contextmanager
    def float_mode(self):
        """Fake-quantization off: the float model whose weights are exported."""
        modules = self.fake_quants()
        for m in modules:
            m.enabled = False
        try:
            yield self.module
        finally:
            for m in modules:
                m.enabled = True

    def activation_ranges(self) -> dict[str, tuple[float, int]]:
        return {tensor: (float(getattr(self.module, fq).scale.detach().clamp_min(1e-12)),
                         int(getattr(self.module, fq).zero_point))
                for fq, tensor in self.owners.items()}


def _fold(module: nn.Module) -> torch.fx.GraphModule:
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(module).eval())
    except Exception as exc:  # symbolic tracing fails in many ways on dynamic models
        raise QuantizeError(f"QAT needs a model torch.fx can trace, to fold its batch norms ({first_line(exc)}).",
                            "Use --method int8 (post-training) for this model.") from exc


def build_qat_model(module: nn.Module, fp32: OnnxArtifact, ptq: OnnxArtifact, config: QuantConfig,
                    sample: np.ndarray, learn_ranges: bool) -> QatModel:
    """Steps 2-3 of the module docstring: `ptq` is the PTQ graph of `fp32` under `config`."""
    gm = _fold(module)
    quantized = quantized_activations(onnx.load(str(ptq.path)))
    values = _onnx_values(fp32, list(quantized), sample)
    mapping = _match(values, _fx_values(gm, torch.from_numpy(sample)), [n.name for n in gm.graph.nodes])
    qmin, qmax = _ACT_RANGE[config.activation_type]
    nodes = {n.name: n for n in gm.graph.nodes}
    fq_of_scale: dict[str, str] = {}
    tensor_fq, owners, done = {}, {}, set()
    for tensor, (scale_name, scale, zero_point) in quantized.items():
        fq = fq_of_scale.get(scale_name)
        if fq is None:
            fq = fq_of_scale[scale_name] = f"act_fq_{len(fq_of_scale)}"
            gm.add_submodule(fq, FakeQuant(scale, zero_point, qmin, qmax, learn_ranges))
        if scale_name == f"{tensor}_scale" or fq not in owners:
            owners[fq] = tensor  # the tensor ORT derives the shared scale from
        tensor_fq[tensor] = fq
        node = nodes[mapping[tensor]]
        if node.name in done:
            continue  # another ONNX tensor with the same values is already fake-quantized here
        done.add(node.name)
        with gm.graph.inserting_after(node):
            fq_node = gm.graph.call_module(fq, (node,))
        node.replace_all_uses_with(fq_node, delete_user_cb=lambda user: user is not fq_node)
    gm.recompile()
    _fake_quantize_weights(gm, fp32, config)
    return QatModel(gm, tensor_fq, owners)


def _fake_quantize_weights(gm: torch.fx.GraphModule, fp32: OnnxArtifact, config: QuantConfig) -> None:
    """A WeightFakeQuant on each quantized layer's weight."""
    floats = config.float_layers()
    for layer in _layer_nodes(onnx.load(str(fp32.path))):
        if layer in floats:
            continue
        try:
            module = gm.get_submodule(layer)
        except AttributeError:
            module = None
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise QuantizeError(f"QAT found no Conv2d/Linear module `{layer}` for the ONNX layer of that name.",
                                "Use --method int8 (post-training) for this model.")
        parametrize.register_parametrization(module, "weight",
                                             WeightFakeQuant(config.per_channel, config.weight_type == "int8",
                                                             config.reduce_range))


# ---------------------------------------------------------------------------------------------------
# Export.


def _write_weights(qat: QatModel, fp32: OnnxArtifact) -> OnnxArtifact:
    """The fp32 ONNX graph with the trained (folded) weights; parity-checked against the float QAT model."""
    model = onnx.load(str(fp32.path))
    inits = {i.name: i for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    for layer, node_name in _layer_nodes(model).items():
        node = by_name[node_name]
        if node.op_type not in ("Conv", "Gemm"):
            raise QuantizeError(f"QAT exports Conv and Gemm layers; `{layer}` is a {node.op_type}.",
                                "Use --method int8 (post-training) for this model.")
        module = qat.module.get_submodule(layer)
        weight = module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") \
            else module.weight
        tensors = [(node.input[1], weight)]
        if len(node.input) > 2 and node.input[2] in inits and module.bias is not None:
            tensors.append((node.input[2], module.bias))
        for name, value in tensors:
            array = value.detach().cpu().numpy().astype(np.float32)
            if tuple(inits[name].dims) != array.shape:
                raise QuantizeError(f"QAT: `{layer}` has shape {array.shape} in torch but {tuple(inits[name].dims)} "
                                    "in ONNX.", "Use --method int8 (post-training) for this model.")
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
    data = model.SerializeToString()
    path = cache_dir("artifacts") / f"qat-{hashlib.sha256(data).hexdigest()[:24]}.onnx"
    atomic_write_bytes(path, data)
    with qat.float_mode() as float_model:
        parity = check_parity(float_model, path, fp32.input_shape, atol=1e-4, rtol=1e-3)
    if not parity.passed:
        raise ExportError(f"The QAT model's weights written into the ONNX graph differ from the torch model: max abs "
                          f"error {parity.max_abs_err:.3g}.", "Re-run with --debug and report the model.")
    return OnnxArtifact(path, sha256_file(path), fp32.input_name, fp32.input_shape, f"{fp32.exporter}+qat", parity)


def export_qat(qat: QatModel, fp32: OnnxArtifact, calibration, config: QuantConfig) -> OnnxArtifact:
    """Step 5: the QAT model as the same QDQ graph PTQ produces, with its trained weights and ranges."""
    return quantize_onnx(_write_weights(qat, fp32), calibration, config, activation_ranges=qat.activation_ranges())
