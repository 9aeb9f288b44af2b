"""ONNX -> Relax -> a compiled TVM library for a target (cross-compiled where the target says), cached.

A library is cached under `cache_dir("tvm-libs")`, keyed by the artifact's hash, the resolved TVM target,
the batch size, the TVM version, the cross compiler and the tuning state of the model's layers (how far each
was tuned), so tuning a layer further rebuilds exactly the models that contain it.
TVM is an extra: everything here imports it lazily, through `import_tvm`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from squeeze import progress
from squeeze.util.cache import atomic_write_bytes, cache_dir
from squeeze.errors import ExportError, RuntimeUnavailableError, TargetError, first_line
from squeeze.export.artifact import OnnxArtifact
from squeeze.target import Target

__all__ = ["TVM_PIN", "FFI_PIN", "INSTALL_HINT", "import_tvm", "device_kind", "device_present", "compile_only",
           "resolve_target", "relax_module", "TvmLibrary", "build_library", "generate_cuda_source", "elf_machine",
           "expected_elf_machine", "ELF_MACHINES"]

TVM_PIN = "0.27.0.post1"
# With apache-tvm-ffi 0.1.15.x even tvm.ir.save_json segfaults under TVM 0.27, and MetaSchedule with it.
FFI_PIN = "0.1.14.post1"
INSTALL_HINT = "pip install 'squeeze[tvm]'"

# e_machine of the ELF header, by the first part of an LLVM target triple.
ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "arm": 40, "armv7": 40, "riscv64": 243, "riscv32": 243}


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def import_tvm():
    """The `tvm` module, after a cheap check of the ffi pin (read from package metadata, before import)."""
    ffi = _installed("apache-tvm-ffi")
    if ffi is not None and _installed("apache-tvm") is not None and ffi != FFI_PIN:
        raise RuntimeUnavailableError(
            f"apache-tvm-ffi {ffi} is installed, but TVM {TVM_PIN} works only with apache-tvm-ffi {FFI_PIN} "
            "(with other versions MetaSchedule segfaults).",
            f"Install the pinned pair: pip install 'apache-tvm=={TVM_PIN}' 'apache-tvm-ffi=={FFI_PIN}' "
            f"(or {INSTALL_HINT}).",
        )
    try:
        import tvm
    except ImportError as exc:
        raise RuntimeUnavailableError(f"TVM targets need Apache TVM, which is not installed ({first_line(exc)}).",
                                      f"Install it: {INSTALL_HINT}") from None
    return tvm


def device_kind(target: Target) -> str:
    """TVM's device of a target: "cuda" for GPU targets, else "cpu" (llvm code, local or on a board)."""
    return "cuda" if target.device == "cuda" else "cpu"


def device_present(target: Target) -> bool:
    """Whether a local runner has its device here (a CPU always; a GPU only with a driver TVM can open)."""
    if device_kind(target) == "cpu":
        return True
    return bool(import_tvm().cuda(0).exist)


def compile_only(target: Target) -> bool:
    """Compile-only by choice (runner) or by circumstance (a local GPU target on a machine without one)."""
    return target.tvm.runner == "compile-only" or (target.tvm.runner == "local" and not device_present(target))


def _target_from_spec(spec: str | dict[str, Any], target: Target):
    tvm = import_tvm()
    if spec == "detect":
        if device_kind(target) == "cuda" and not device_present(target):
            raise TargetError(f"Target `{target.name}` asks to detect its GPU, but TVM finds no CUDA device here.",
                              "Run it on a machine with an NVIDIA GPU and driver, or set `tvm.compile_only_target` "
                              "(e.g. nvidia/nvidia-a100) to check code generation only.")
        found = dict(tvm.target.Target.from_device(tvm.device(device_kind(target), 0)).export())
        for generated in ("tag", "keys"):
            found.pop(generated, None)
        if found.get("kind") == "llvm":
            # MetaSchedule plans parallel loops for this many cores; Target.from_device leaves it out.
            found["num-cores"] = os.cpu_count() or 1
        spec = found
    try:
        return tvm.target.Target(spec)
    except Exception as exc:  # TVM raises its own error types for unknown tags, kinds and attributes
        raise TargetError(
            f"Target `{target.name}`: TVM does not accept the target {json.dumps(spec)} ({first_line(exc)}).",
            "Use `detect`, a tag from tvm.target.list_tags() (e.g. raspberry-pi/4b-aarch64), or a dict such as "
            "{kind: llvm, mtriple: aarch64-linux-gnu, mcpu: cortex-a72, mattr: ['+neon'], num-cores: 4}.",
        ) from None


def resolve_target(target: Target):
    """The tvm.target.Target to compile for: `compile_only_target` where the device is absent, if given."""
    tvm = import_tvm()
    opts = target.tvm
    spec = opts.compile_only_target if compile_only(target) and opts.compile_only_target else opts.target
    resolved = _target_from_spec(spec, target)
    if opts.host is not None:
        resolved = tvm.target.Target(resolved, _target_from_spec(opts.host, target))
    return resolved


def target_json(tvm_target) -> str:
    return json.dumps(dict(tvm_target.export()), sort_keys=True, default=str)


def relax_module(artifact: OnnxArtifact, batch_size: int):
    """The ONNX artifact as a Relax module with a static input shape (batch fixed to `batch_size`)."""
    import onnx

    import_tvm()
    from tvm.relax.frontend.onnx import from_onnx

    shape = [batch_size, *artifact.input_shape[1:]]
    try:
        return from_onnx(onnx.load(str(artifact.path)), shape_dict={artifact.input_name: shape}, dtype_dict="float32")
    except Exception as exc:  # the importer raises many types (unsupported op, bad attribute)
        raise ExportError(f"TVM's ONNX importer cannot read {artifact.path.name} ({first_line(exc)}).",
                          "Re-export with the other exporter (--exporter torchscript|dynamo), or replace the "
                          "unsupported operator in the model.") from None


def lower_for_tuning(mod, tvm_target):
    """Legalize and fuse as MetaSchedule sees it: its tasks are the fused TIR functions of this module."""
    tvm = import_tvm()
    from tvm import relax

    with tvm_target:
        return tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                         relax.transform.CanonicalizeBindings(), relax.get_pipeline("zero")])(mod)


@dataclass(frozen=True)
class TvmLibrary:
    path: Path
    target_json: str
    key: str
    tuning: dict | None  # TuningReport.to_json() of the build that tuned it, or None when untuned


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _fcompile(target: Target):
    cc = target.tvm.cross_compiler
    if cc is None:
        return None
    if shutil.which(cc) is None:
        raise TargetError(f"Target `{target.name}` cross-compiles with `{cc}`, which is not on PATH.",
                          "On Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu (for aarch64-linux-gnu-g++).")
    import_tvm()
    from tvm.support.cc import cross_compiler

    return cross_compiler(cc)


def build_library(artifact: OnnxArtifact, target: Target, batch_size: int = 1, *, tune: bool = True,
                  use_cache: bool = True) -> TvmLibrary:
    """Compile `artifact` for `target`, tuning its layers first where the target asks and `tune` allows.

    A tuned model's workloads are remembered beside its library, so that opening it again (every measurement
    round, every worker) skips the import and lowering when all its layers are already tuned far enough.
    """
    tvm = import_tvm()
    tvm_target = resolve_target(target)
    tuned = tune and target.tvm.tuning == "metaschedule" and not target.emulated
    base = _key(artifact.sha256, target_json(tvm_target), batch_size, tvm.__version__, target.tvm.cross_compiler)
    folder = cache_dir("tvm-libs")
    index = folder / f"{base}.workloads.json"
    report = None
    if tuned and use_cache and index.exists():
        from squeeze.export.tuning import known_tuning

        report = known_tuning(json.loads(index.read_text()), tvm_target, target)
    if report is not None and (folder / f"{_key(base, report.state)}.so").exists():
        return _library(folder, base, tvm_target, report)
    if not tuned and use_cache and (folder / f"{_key(base, 'untuned')}.so").exists():
        return _library(folder, base, tvm_target, None)
    mod = relax_module(artifact, batch_size)
    if tuned:
        from squeeze.export.tuning import ensure_tuned

        mod = lower_for_tuning(mod, tvm_target)
        report = ensure_tuned(mod, tvm_target, target)
        atomic_write_bytes(index, json.dumps(report.workloads).encode())
    lib = _library(folder, base, tvm_target, report)
    if use_cache and lib.path.exists():
        return lib
    fcompile = _fcompile(target)
    with progress.task(f"compiling {artifact.path.name} for {target.name}" + ("" if tuned else " (untuned)")):
        try:
            if tuned:
                from tvm import relax

                with tvm_target, report.database, tvm.transform.PassContext(opt_level=3):
                    mod = relax.transform.MetaScheduleApplyDatabase()(mod)
            executable = tvm.compile(mod, tvm_target)
        except Exception as exc:  # TVM's lowering and codegen raise their own error types
            raise ExportError(f"TVM could not compile {artifact.path.name} for `{target.name}` "
                              f"({first_line(exc)}).", "Re-run with --debug for the trace; check the target's "
                              "`tvm.target`.") from None
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tmp_path = Path(tmp) / lib.path.name
        try:
            executable.export_library(str(tmp_path), fcompile=fcompile)
        except Exception as exc:  # the compiler's message is in the exception text
            raise ExportError(f"Linking the TVM library for `{target.name}` failed ({first_line(exc, 400)}).",
                              "Check the cross compiler (`tvm.cross_compiler`) and its sysroot.") from None
        os.replace(tmp_path, lib.path)
    return lib


def _library(folder: Path, base: str, tvm_target, report) -> TvmLibrary:
    key = _key(base, report.state if report else "untuned")
    return TvmLibrary(folder / f"{key}.so", target_json(tvm_target), key, report.to_json() if report else None)


def generate_cuda_source(artifact: OnnxArtifact, target: Target, batch_size: int = 1) -> str:
    """Compile for a CUDA target without a GPU and return the generated kernels' CUDA source."""
    tvm = import_tvm()
    tvm_target = resolve_target(target)
    try:
        executable = tvm.compile(relax_module(artifact, batch_size), tvm_target)
    except Exception as exc:  # TVM's lowering and codegen raise their own error types
        raise ExportError(f"TVM could not generate CUDA code for `{target.name}` ({first_line(exc)}).",
                          "Check the target's `tvm.target` / `tvm.compile_only_target`.") from None
    sources = []

    def walk(module) -> None:
        if module.kind == "cuda":
            sources.append(module.inspect_source("cuda"))
        for sub in module.imports:
            walk(sub)

    walk(executable.mod)
    if not sources:
        raise ExportError(f"TVM produced no CUDA module for `{target.name}`.", "Check that the target's kind is cuda.")
    return "\n".join(sources)


def elf_machine(path: Path) -> int | None:
    """e_machine of an ELF file (None when it is not ELF)."""
    head = Path(path).read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    return int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")


def expected_elf_machine(tvm_target) -> int | None:
    """The ELF machine a CPU target's library must have (from its mtriple), or None when unknown."""
    triple = str(tvm_target.attrs.get("mtriple", "")) if tvm_target.kind.name == "llvm" else ""
    return ELF_MACHINES.get(triple.split("-")[0]) if triple else None
