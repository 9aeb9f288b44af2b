"""torch -> ONNX export with a dynamic batch axis, a parity check against torch, and a content-hash cache."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import onnx
import torch

from squeeze.util.cache import atomic_write_bytes, cache_dir, sha256_file
from squeeze.errors import ExportError, first_line
from squeeze.export.artifact import OnnxArtifact, Parity, compare_outputs
from squeeze.export.ort import open_session
from squeeze.model.loading import LoadedModel

__all__ = ["Exporter", "Parity", "OnnxArtifact", "export_onnx", "check_parity"]

Exporter = Literal["dynamo", "torchscript"]
OPSET = 18


_memo: dict[str, OnnxArtifact] = {}


def _input_name(path: Path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    return next(i.name for i in graph.input if i.name not in inits)


def _run_exporter(module: torch.nn.Module, x: torch.Tensor, exporter: Exporter, out: Path) -> None:
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(
                module, (x,), input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: batch},), dynamo=True, opset_version=OPSET, verbose=False,
            )
            program.save(str(out))
        else:
            torch.onnx.export(
                module, (x,), str(out), input_names=["input"], output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, dynamo=False, opset_version=17,
            )


def check_parity(module: torch.nn.Module, path: Path, input_shape: tuple[int, ...], *, atol: float, rtol: float,
                 batch_size: int = 2, seed: int = 0) -> Parity:
    """Run torch and ONNX Runtime on the same seeded batch (batch 2 also exercises the dynamic axis);
    passes when |ort - torch| <= max(atol, rtol * max|torch|) + rtol * |torch| (`compare_outputs`)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_shape[1:]), generator=g)
    with torch.no_grad():
        ref = module(x).detach().numpy()
    sess = open_session(path)
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return compare_outputs(got, ref, atol, rtol)


def _cache_key(loaded: LoadedModel, exporter: str) -> str:
    h = hashlib.sha256(f"{loaded.fingerprint}|{exporter}|{OPSET}|{torch.__version__}|{onnx.__version__}".encode())
    return h.hexdigest()[:24]


def export_onnx(loaded: LoadedModel, *, exporter: Exporter = "dynamo", atol: float = 1e-4, rtol: float = 1e-3,
                use_cache: bool = True) -> OnnxArtifact:
    """Export once per content (in-process and on disk); try the other exporter if the chosen one fails."""
    if loaded.module is None:
        p = Path(loaded.onnx_path)
        return OnnxArtifact(p, sha256_file(p), _input_name(p), loaded.input_shape, "source", None)
    key = _cache_key(loaded, exporter)
    if use_cache and key in _memo:
        return _memo[key]
    folder = cache_dir("artifacts")
    path, meta_path = folder / f"{key}.onnx", folder / f"{key}.json"
    if use_cache and path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        art = OnnxArtifact(path, sha256_file(path), meta["input_name"], tuple(meta["input_shape"]), meta["exporter"],
                           Parity(**meta["parity"]))
        _memo[key] = art
        return art

    module = loaded.module.eval()
    x = loaded.example_input(batch_size=2)
    errors = []
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        for kind in (exporter, "torchscript" if exporter == "dynamo" else "dynamo"):
            try:
                _run_exporter(module, x, kind, tmp_path)
                used = kind
                break
            except Exception as exc:  # exporter failures are many types; both are tried before giving up
                errors.append(f"{kind}: {first_line(exc)}")
        else:
            raise ExportError(
                f"`{loaded.name}` could not be exported to ONNX ({'; '.join(errors)}).",
                "Run with --debug for the full trace; unsupported ops must be rewritten or replaced in the model.",
            )
        parity = check_parity(module, tmp_path, loaded.input_shape, atol=atol, rtol=rtol)
        if not parity.passed:
            raise ExportError(
                f"The ONNX export of `{loaded.name}` differs from the torch model: max abs error "
                f"{parity.max_abs_err:.3g}, {parity.max_rel_err:.3g} of the output's largest magnitude (allowed: "
                f"|err| <= max(atol, rtol * max|output|) + rtol * |output|, atol={atol}, rtol={rtol}).",
                "Try the other exporter (--exporter torchscript|dynamo), or check for nondeterministic or "
                "training-mode layers.",
            )
        atomic_write_bytes(path, tmp_path.read_bytes())
    meta = {"input_name": _input_name(path), "input_shape": list(loaded.input_shape), "exporter": used,
            "parity": asdict(parity)}
    atomic_write_bytes(meta_path, json.dumps(meta).encode())
    art = OnnxArtifact(path, sha256_file(path), meta["input_name"], loaded.input_shape, used, parity)
    _memo[key] = art
    return art
