"""Safe loading and saving of models.

Accepted model references (detected from the file, never from a trusted pickle by default):
  zoo:NAME               a built-in model (`squeeze list models`)
  pkg.module:factory     a factory on the Python path, with optional --weights (state_dict or checkpoint)
  file.pt                a squeeze checkpoint: architecture reference + plans + state_dict, loaded
                         with `torch.load(weights_only=True)` so no code from the file runs
  file.pt (pickle)       a whole pickled nn.Module: refused unless trust=True (unpickling runs code)
  file.pt (TorchScript)  `torch.jit.save` archives
  file.onnx              an ONNX model (info / bench only)
"""

from __future__ import annotations

import hashlib
import importlib
import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import onnx
import torch
from torch import nn

from squeeze.model import zoo
from squeeze.util.cache import atomic_write_bytes
from squeeze.errors import InputShapeError, ModelLoadError, UntrustedModelError, first_line
from squeeze.preprocessing import Preprocessing
from squeeze.util.refs import import_ref, is_ref
from squeeze.registry import Registry

__all__ = [
    "ArchRef",
    "LoadedModel",
    "load_model",
    "save_checkpoint",
    "checkpoint_bytes",
    "register_plan_kind",
    "module_fingerprint",
]

CHECKPOINT_FORMAT = "squeeze-checkpoint"
CHECKPOINT_VERSION = 1

ModelKind = Literal["zoo", "factory", "checkpoint", "pickle", "torchscript", "onnx"]


@dataclass(frozen=True)
class ArchRef:
    """How to rebuild the architecture: an importable `package.module:factory` and its kwargs."""

    ref: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return _import_factory(self.ref)(**self.kwargs)


@dataclass
class LoadedModel:
    """A model ready for the passes: a torch module (or, for .onnx input, only the ONNX file)."""

    name: str
    kind: ModelKind
    input_shape: tuple[int, ...]  # (N, C, H, W) with N = 1
    module: nn.Module | None = None
    onnx_path: Path | None = None
    arch: ArchRef | None = None
    plans: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    # How data was fed when the weights were last trained or evaluated here; reused for --data on reload.
    preprocessing: Preprocessing | None = None

    @property
    def fingerprint(self) -> str:
        """Content hash: equal for the same weights, structure and input shape."""
        h = hashlib.sha256(repr(self.input_shape).encode())
        if self.module is not None:
            h.update(module_fingerprint(self.module).encode())
        else:
            h.update(Path(self.onnx_path).read_bytes())
        return h.hexdigest()[:16]

    def example_input(self, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn((batch_size, *self.input_shape[1:]), generator=g)


# Plans recorded in a checkpoint are replayed on the freshly built architecture before the state_dict
# is loaded (a pruned model has other tensor shapes). Passes register the plan kinds they emit.
_PLAN_APPLIERS: Registry[Callable[[nn.Module, dict[str, Any], tuple[int, ...]], nn.Module]] = Registry(
    "plan kind", error=ModelLoadError)
# Where each plan kind is registered, imported only when a checkpoint needs it (keeps loading light).
_PLAN_MODULES = {"channels": "squeeze.prune", "multidim": "squeeze.prune.multidim",
                 "reparam": "squeeze.reparam.plan"}


def register_plan_kind(kind: str):
    return _PLAN_APPLIERS.register(kind)


def module_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for m in module.modules():
        h.update(f"{type(m).__module__}.{type(m).__qualname__}".encode())
    h.update(repr(module).encode())
    code = getattr(module, "code", None)  # TorchScript carries its forward as code
    if isinstance(code, str):
        h.update(code.encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _import_factory(ref: str) -> Callable[..., nn.Module]:
    fn = import_ref(ref, ModelLoadError, "model factory")
    if not callable(fn):
        raise ModelLoadError(f"`{ref}` is not callable.", "Point to a function that returns an nn.Module.")
    return fn


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    obj = _safe_torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj["state_dict"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ModelLoadError(f"{path} holds no state_dict.", "Pass a file saved with torch.save(model.state_dict()).")


def _load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"The weights in {source} do not fit the architecture ({first_line(exc, 300)}).",
            "Check that the weights belong to this architecture and its keyword arguments.",
        ) from exc


def _safe_torch_load(path: Path) -> Any:
    """torch.load with weights_only=True; an object pickle becomes UntrustedModelError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt archives
        msg = str(exc)
        globals_ = sorted(set(re.findall(r"GLOBAL ([\w.]+)", msg)))
        if "Weights only load failed" in msg and globals_:
            raise UntrustedModelError(
                f"{path} is a pickled Python object (it references {', '.join(globals_)}); unpickling it "
                "would run code from the file, so squeeze refused to load it.",
                "If you trust where it came from, pass --trust-model; better, save its state_dict and name the "
                "model as package.module:factory@FILE (or package.module:factory --weights FILE), or write a "
                "squeeze checkpoint with squeeze.model.loading.save_checkpoint (README: your own model).",
            ) from exc
        raise ModelLoadError(
            f"{path} is not a readable PyTorch file ({first_line(exc, 160)}).",
            "The file may be truncated or corrupt; re-save or re-download it.",
        ) from exc


def _trusted_pickle_load(path: Path) -> nn.Module:
    obj = torch.load(path, map_location="cpu", weights_only=False)  # trust gate: only with --trust-model
    if not isinstance(obj, nn.Module):
        raise ModelLoadError(f"{path} holds a {type(obj).__name__}, not an nn.Module.")
    return obj


def _onnx_input_shape(model: onnx.ModelProto, path: Path) -> tuple[int, ...] | None:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelLoadError(f"{path} has {len(inputs)} inputs; squeeze handles single-input models.")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if shape and shape[0] is None:
        shape[0] = 1  # dynamic batch
    return tuple(shape) if all(d is not None for d in shape) else None


def _load_file(path: Path, trust: bool) -> LoadedModel:
    if path.suffix.lower() == ".onnx":
        try:
            proto = onnx.load(str(path), load_external_data=False)
            onnx.checker.check_model(proto)
        except Exception as exc:
            raise ModelLoadError(
                f"{path} is not a valid ONNX model ({first_line(exc, 160)}).",
                "Re-export it, or check that the file is complete.",
            ) from exc
        return LoadedModel(path.stem, "onnx", _onnx_input_shape(proto, path) or (), onnx_path=path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any("/code/" in n for n in zf.namelist()):
                try:
                    module = torch.jit.load(str(path), map_location="cpu")
                except Exception as exc:
                    raise ModelLoadError(f"{path} is a damaged TorchScript archive ({first_line(exc)}).") from exc
                return LoadedModel(path.stem, "torchscript", (), module=module.eval())
    try:
        obj = _safe_torch_load(path)
    except UntrustedModelError:
        if not trust:
            raise
        return LoadedModel(path.stem, "pickle", (), module=_trusted_pickle_load(path).eval())
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return _from_checkpoint(obj, path)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"{path} is a bare state_dict: it has weights but no architecture.",
            f"Name the architecture with its weights: package.module:factory@{path} (or package.module:factory "
            f"--weights {path}), with --input-shape.",
        )
    raise ModelLoadError(f"{path} holds a {type(obj).__name__}, which squeeze cannot use as a model.")


# A checkpoint names its architecture by import path. The zoo's factories all lived in `squeeze.zoo` until
# each architecture got its module; checkpoints saved before then still name them there.
_MOVED_REFS = {
    "squeeze.zoo:resnet18": "squeeze.model.zoo.resnet:resnet18",
    "squeeze.zoo:mobilenet_v2": "squeeze.model.zoo.mobilenet_v2:mobilenet_v2",
    "squeeze.zoo:densenet121": "squeeze.model.zoo.densenet:densenet121",
    "squeeze.zoo:digits_cnn": "squeeze.model.zoo.digits_cnn:digits_cnn",
    "squeeze.zoo:fashion_cnn": "squeeze.model.zoo.fashion_cnn:fashion_cnn",
}


def _from_checkpoint(ckpt: dict[str, Any], path: Path) -> LoadedModel:
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise ModelLoadError(f"{path} was written by a newer squeeze (format {ckpt['version']}).", "Upgrade squeeze.")
    ref = ckpt["arch"]["ref"]
    arch = ArchRef(_MOVED_REFS.get(ref, ref), dict(ckpt["arch"].get("kwargs", {})))
    input_shape = tuple(ckpt["input_shape"])
    module = arch.build()
    plans = list(ckpt.get("plans", []))
    for plan in plans:
        if plan.get("kind") not in _PLAN_APPLIERS and plan.get("kind") in _PLAN_MODULES:
            importlib.import_module(_PLAN_MODULES[plan["kind"]])
        if plan.get("kind") not in _PLAN_APPLIERS:
            raise ModelLoadError(
                f"{path} records a `{plan.get('kind')}` plan that this squeeze version cannot replay.",
                f"Known plan kinds: {', '.join(_PLAN_APPLIERS.names()) or '(none)'}; upgrade squeeze.",
            )
        module = _PLAN_APPLIERS.get(plan["kind"])(module, plan, input_shape)
    _load_state(module, ckpt["state_dict"], str(path))
    name = ckpt.get("metadata", {}).get("name", path.stem)
    return LoadedModel(name, "checkpoint", input_shape, module.eval(), None, arch, plans, dict(ckpt.get("metadata", {})),
                       _recorded_preprocessing(ckpt, path))


def _recorded_preprocessing(ckpt: dict[str, Any], path: Path) -> Preprocessing | None:
    recorded = ckpt.get("preprocessing")
    if recorded is None:  # written before squeeze recorded it, or never evaluated on data
        return None
    try:
        return Preprocessing.model_validate(recorded)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ModelLoadError(f"{path} records a preprocessing squeeze cannot read ({first_line(exc, 160)}).",
                             "Re-save the checkpoint, or pass --normalize and --resize to decide it.") from exc


def load_model(
    spec: str,
    *,
    input_shape: tuple[int, ...] | None = None,
    weights: str | None = None,
    trust: bool = False,
    trained: bool = True,
) -> LoadedModel:
    """Resolve a model reference (see module docstring) and check it accepts its input shape; `trained=False`
    leaves a trained zoo entry untrained (`zoo.create_model`)."""
    spec, weights = _split_weights(spec, weights)
    path = Path(spec)
    if spec.startswith("zoo:"):
        entry = zoo.get_entry(spec[4:])
        module = zoo.create_model(entry.name, trained=trained)
        loaded = LoadedModel(entry.name, "zoo", entry.input_shape, module, arch=ArchRef(entry.arch_ref))
    elif path.exists():
        if path.is_dir():
            raise ModelLoadError(f"{path} is a folder, not a model file.")
        loaded = _load_file(path, trust)
    elif is_ref(spec):
        arch = ArchRef(spec)
        module = arch.build()
        if not isinstance(module, nn.Module):
            raise ModelLoadError(f"`{spec}` returned a {type(module).__name__}, not an nn.Module.")
        loaded = LoadedModel(spec.split(":")[1], "factory", (), module.eval(), arch=arch)
    else:
        raise ModelLoadError(
            f"No model at `{spec}`: it is neither an existing file, nor `zoo:NAME`, nor `package.module:factory`.",
            "Check the path, or run `squeeze list models` for the built-in ones.",
        )
    if weights is not None:
        if loaded.module is None or loaded.kind in ("torchscript", "pickle"):
            raise ModelLoadError("--weights applies to zoo and factory models only.")
        _load_state(loaded.module, _read_state_dict(Path(weights)), weights)
    if input_shape is not None:
        loaded.input_shape = tuple(input_shape)
    if not loaded.input_shape:
        raise InputShapeError(
            f"{spec} does not record its input shape.",
            "Pass --input-shape, batch first, e.g. --input-shape 1,3,224,224.",
        )
    _check_finite(loaded, spec)
    _check_input_shape(loaded, spec)
    return loaded


def _split_weights(spec: str, weights: str | None) -> tuple[str, str | None]:
    """`zoo:NAME@w.pt` / `package.module:factory@w.pt`: a model that carries its own weights, so that one
    command can take several (an original and its pruned checkpoint, each with its own file)."""
    head, sep, tail = spec.rpartition("@")
    if not sep or not (head.startswith("zoo:") or is_ref(head)):
        return spec, weights
    if weights is not None:
        raise ModelLoadError(f"`{spec}` names its weights and --weights {weights} names others.",
                             "Give the weights one way: MODEL@FILE, or --weights FILE.")
    return head, tail


def _check_finite(loaded: LoadedModel, spec: str) -> None:
    """NaN or infinite weights make every later step fail obscurely (calibration, parity): say which tensor."""
    if loaded.module is None:
        return
    tensors = [*loaded.module.named_parameters(), *loaded.module.named_buffers()]
    bad = [(name, t) for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        listed = ", ".join(f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)" for name, t in bad[:5])
        raise ModelLoadError(
            f"{spec} has non-finite (NaN or infinite) weights in {len(bad)} tensor(s): {listed}"
            f"{', ...' if len(bad) > 5 else ''}.",
            "The training diverged or the file is damaged: re-export the weights from a good checkpoint.")


def _check_input_shape(loaded: LoadedModel, spec: str) -> None:
    if loaded.module is None:
        expected = _onnx_input_shape(onnx.load(str(loaded.onnx_path), load_external_data=False), loaded.onnx_path)
        if expected and tuple(expected[1:]) != tuple(loaded.input_shape[1:]):
            raise InputShapeError(
                f"{spec} expects input {expected} but --input-shape is {loaded.input_shape}.",
                f"Use --input-shape {','.join(map(str, expected))} or leave it out.",
            )
        return
    try:
        with torch.no_grad():
            loaded.module(loaded.example_input())
    except Exception as exc:
        raise InputShapeError(
            f"{spec} rejected an input of shape {loaded.input_shape} ({first_line(exc).rstrip('.')}).",
            "Pass the shape the model was built for with --input-shape (batch first, e.g. 1,3,224,224).",
        ) from exc


def save_checkpoint(path: Path, loaded: LoadedModel) -> None:
    """Write a squeeze checkpoint atomically: re-loadable with weights_only=True, no pickled classes."""
    atomic_write_bytes(Path(path), checkpoint_bytes(loaded))


def checkpoint_bytes(loaded: LoadedModel) -> bytes:
    if loaded.arch is None or loaded.module is None:
        raise ModelLoadError(
            f"Cannot write a squeeze checkpoint for `{loaded.name}`: its architecture has no importable factory.",
            "Load the model as zoo:NAME or package.module:factory to produce checkpoints.",
        )
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": {"ref": loaded.arch.ref, "kwargs": dict(loaded.arch.kwargs)},
        "plans": list(loaded.plans),
        "state_dict": {k: v.detach().cpu() for k, v in loaded.module.state_dict().items()},
        "input_shape": list(loaded.input_shape),
        "metadata": {"name": loaded.name, **loaded.metadata},
        # Plain JSON (str, float, None): weights_only loading accepts it.
        "preprocessing": None if loaded.preprocessing is None else loaded.preprocessing.to_json(),
    }
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()
