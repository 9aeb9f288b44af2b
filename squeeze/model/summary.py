"""Model summaries: parameters, MACs per layer (torch's FlopCounterMode), size, layer table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from squeeze.model.loading import LoadedModel

__all__ = ["LayerSummary", "ModelSummary", "summarize"]


@dataclass(frozen=True)
class LayerSummary:
    name: str
    type: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass
class ModelSummary:
    name: str
    kind: str
    input_shape: tuple[int, ...]
    params: int
    size_bytes: int
    macs: int | None  # None where no counter applies (ONNX input)
    layers: list[LayerSummary] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _leaf_output_shapes(module: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_m, _i, output) -> None:  # returning a value would replace the layer's output
            if isinstance(output, torch.Tensor):
                shapes.setdefault(name, tuple(output.shape))

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in module.named_modules()
             if name and not list(m.children())]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _macs_by_module(module: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, int]]:
    """FlopCounterMode counts 2 FLOPs per multiply-accumulate; keys are `RootClass.path.to.module`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values()) // 2
    per_module = {}
    for key, ops in counts.items():
        if key != "Global" and "." in key:
            per_module[key.split(".", 1)[1]] = sum(ops.values()) // 2
    return total, per_module


def _summarize_onnx(loaded: LoadedModel) -> ModelSummary:
    proto = onnx.load(str(loaded.onnx_path), load_external_data=False)
    params = sum(int(torch.Size(i.dims).numel()) for i in proto.graph.initializer)
    return ModelSummary(
        loaded.name, loaded.kind, loaded.input_shape, params, loaded.onnx_path.stat().st_size, None,
        notes=["MACs are counted on torch models; pass the PyTorch model (checkpoint or factory) to get them."],
    )


def summarize(loaded: LoadedModel) -> ModelSummary:
    if loaded.module is None:
        return _summarize_onnx(loaded)
    module = loaded.module.eval()
    x = loaded.example_input()
    params = sum(p.numel() for p in module.parameters())
    size_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    notes = []
    try:
        macs, per_module = _macs_by_module(module, x)
    except Exception as exc:  # scripted code may bypass the counter's dispatch mode
        macs, per_module = None, {}
        notes.append(f"MACs could not be counted for this model ({type(exc).__name__}).")
    shapes = _leaf_output_shapes(module, x) if loaded.kind != "torchscript" else {}
    if loaded.kind == "torchscript":
        notes.append("TorchScript: layer table not available; totals only.")
    layers = [
        LayerSummary(name, type(m).__name__, shapes.get(name, ()), sum(p.numel() for p in m.parameters(recurse=False)),
                     per_module.get(name, 0))
        for name, m in module.named_modules()
        if name and not list(m.children())
    ]
    return ModelSummary(loaded.name, loaded.kind, loaded.input_shape, params, size_bytes, macs, layers, notes)
