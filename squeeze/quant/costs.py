"""Per-layer cost table for mixed precision (HAQ's hardware feedback), measured on the target.

For every quantizable layer (Conv2d, Linear) and every precision the target's runtime really executes,
the layer alone is exported, converted to that precision and timed on the target, exactly as the pruning
lookup tables do it (squeeze.measure.lut): same layer keys, same SQLite table in the measurement cache,
batches interleaved with the same anchor layer so that entries from different runs share a time base.
The fp32 entry of a layer *is* its pruning-table entry (same key); other precisions add a suffix:
`conv2d_in16x16x16_out32_k3x3_s1x1_p1x1_g1` and `..._int8`.

Precisions (`weight bits / activation bits`):
  fp32   32/32  always measured
  fp16   16/16  measured only where the runtime has fp16 kernels (probed: on a CPU, ORT wraps fp16
                convolutions in Casts to fp32, which is not fp16 execution, so there is no fp16 row)
  int8    8/8   QDQ, uint8 activations and per-channel int8 weights (the fast pair on x86, see the
                platform notes), measured
  int4w   4/32  Linear only: 4-bit weight-only MatMulNBits (squeeze.quant.mixed), measured
  wNa8    N/8   N = 2..7, convolutions: no runtime has such a kernel; *modelled* as the layer's measured
                int8 latency x N/8 (a bit-serial accelerator's cost, as in HAQ), flagged, and allowed only
                under a model-size budget
Every row says whether its latency was measured or modelled. Size is counted: weight params x bits / 8
plus the bias in 32 bits.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from squeeze.errors import TargetError
from squeeze.measure.lut import LatencyTable, LayerConfig
from squeeze.target import Target

__all__ = ["Precision", "PRECISIONS", "modelled_precision", "precision", "PrecisionConfig", "CostRow", "CostTable",
           "runtime_precisions", "layer_size_bytes"]


@dataclass(frozen=True)
class Precision:
    name: str
    weight_bits: int
    act_bits: int
    kernel: bool  # the runtime executes it (measured); False: cost modelled, export simulated


PRECISIONS = {
    "fp32": Precision("fp32", 32, 32, True),
    "fp16": Precision("fp16", 16, 16, True),
    "int8": Precision("int8", 8, 8, True),
    "int4w": Precision("int4w", 4, 32, True),
}
MODELLED_BITS = range(2, 8)


def modelled_precision(bits: int) -> Precision:
    if bits not in MODELLED_BITS:
        raise ValueError(f"modelled precisions have 2..7 weight bits, not {bits}")
    return Precision(f"w{bits}a8", bits, 8, False)


def precision(name: str) -> Precision:
    """`fp32`, `fp16`, `int8`, `int4w` or a modelled `wNa8`."""
    if name in PRECISIONS:
        return PRECISIONS[name]
    return modelled_precision(int(name[1:name.index("a")]))


@dataclass(frozen=True)
class PrecisionConfig:
    """A layer configuration in one measured precision: what the cost table times."""

    layer: LayerConfig
    precision: str

    @property
    def key(self) -> str:
        return self.layer.key if self.precision == "fp32" else f"{self.layer.key}_{self.precision}"


def layer_size_bytes(layer: LayerConfig, weight_bits: int) -> float:
    """Weights at `weight_bits`, bias in 32 bits."""
    k = layer.kernel[0] * layer.kernel[1] if layer.op == "conv2d" else 1
    weights = layer.c_out * (layer.c_in // layer.groups) * k
    return weights * weight_bits / 8 + 4 * layer.c_out


@dataclass(frozen=True)
class CostRow:
    layer: str  # torch module name
    key: str  # cost-table key
    precision: str
    weight_bits: int
    act_bits: int
    latency_ms: float  # in the table's time base (see LatencyTable)
    size_bytes: float
    measured: bool
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _fp16_executes(providers: list[str]) -> tuple[bool, str]:
    """Does ONNX Runtime run an fp16 Conv as fp16 on these providers? Looks for the Casts that ORT inserts
    around nodes its providers have no fp16 kernel for."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from squeeze.export.ort import open_session

    weight = numpy_helper.from_array(np.zeros((8, 8, 3, 3), np.float16), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "opt.onnx"
        open_session(model.SerializeToString(), providers,
                     graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                     optimized_model_filepath=str(optimized))
        ops = [n.op_type for n in onnx.load(str(optimized)).graph.node]
    if "Cast" in ops:
        return False, f"ONNX Runtime has no fp16 Conv kernel on {', '.join(providers)} (it casts to fp32)"
    return True, ""


@functools.lru_cache(maxsize=None)
def _probe(providers: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    fp16, why = _fp16_executes(list(providers))
    if fp16:
        return ("fp32", "fp16", "int8", "int4w"), ()
    return ("fp32", "int8", "int4w"), (("fp16", why),)


def runtime_precisions(target: Target) -> tuple[list[str], dict[str, str]]:
    """(precisions the target's runtime executes, {precision: why not} for the others)."""
    if target.runtime != "onnxruntime":
        raise TargetError(f"Mixed-precision costs are measured with ONNX Runtime; target `{target.name}` uses "
                          f"`{target.runtime}`.", "Use an ONNX Runtime target (--target host-cpu or cuda).")
    from squeeze.measure.runtimes import get_runtime

    executed, missing = _probe(tuple(get_runtime(target).providers(target)))
    return list(executed), dict(missing)


def _timing_calibration(layer: LayerConfig):
    """Random inputs: the int8 kernels' speed does not depend on the calibrated ranges."""
    from squeeze.quant.calibrate import CalibrationData

    shape = (8, layer.c_in) if layer.op == "linear" else (8, layer.c_in, layer.h, layer.w)
    inputs = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return CalibrationData(inputs, "random normal inputs (timing only)", 8)


class CostTable(LatencyTable):
    """LatencyTable whose entries can also be layers in int8 / fp16 / int4w (PrecisionConfig)."""

    def __init__(self, target: Target, protocol=None, *, batch_size: int = 1) -> None:
        super().__init__(target, protocol, batch_size=batch_size)
        self.precisions, self.unsupported = runtime_precisions(target)

    def _artifact(self, cfg: LayerConfig | PrecisionConfig):
        from squeeze.export.onnx import export_onnx
        from squeeze.model.loading import LoadedModel

        layer = cfg if isinstance(cfg, LayerConfig) else cfg.layer
        module, shape = layer.build()
        # TorchScript, as LatencyTable: the fp32 entries are the very ones the pruning tables use.
        fp32 = export_onnx(LoadedModel(layer.key, "factory", shape, module), exporter="torchscript")
        name = "fp32" if isinstance(cfg, LayerConfig) else cfg.precision
        if name == "fp32":
            return fp32
        from squeeze.quant.ptq import QuantConfig, quantize_onnx, to_fp16

        if name == "int8":
            return quantize_onnx(fp32, _timing_calibration(layer), QuantConfig())
        if name == "fp16":
            return to_fp16(fp32)
        from squeeze.quant.mixed import int4_weights

        return int4_weights(fp32, ["0"])  # the standalone layer is module `0` of its Sequential

    def measured_precisions(self, layer: LayerConfig) -> list[str]:
        """The measured precisions of a layer on this target (int4w only for Linear)."""
        return [p for p in self.precisions if p != "int4w" or layer.op == "linear"]

    def rows(self, layers: dict[str, LayerConfig], modelled: bool = False) -> list[CostRow]:
        """Every layer in every measured precision (measuring what is not stored yet); with `modelled`,
        also the 2..7-bit convolution rows derived from the int8 ones."""
        configs = {name: [PrecisionConfig(layer, p) for p in self.measured_precisions(layer)]
                   for name, layer in layers.items()}
        flat = [c.layer if c.precision == "fp32" else c for cs in configs.values() for c in cs]
        entries = self.entries(flat)
        out = []
        for name, cs in configs.items():
            layer = layers[name]
            for c in cs:
                p = PRECISIONS[c.precision]
                out.append(CostRow(name, c.key, p.name, p.weight_bits, p.act_bits, entries[c.key].median_ms,
                                   layer_size_bytes(layer, p.weight_bits), True))
            if modelled and layer.op == "conv2d":
                int8_ms = entries[PrecisionConfig(layer, "int8").key].median_ms
                for bits in MODELLED_BITS:
                    p = modelled_precision(bits)
                    out.append(CostRow(name, f"{layer.key}_{p.name}", p.name, bits, 8, int8_ms * bits / 8,
                                       layer_size_bytes(layer, bits), False,
                                       f"no {bits}-bit kernel: int8 latency x {bits}/8"))
        return out
