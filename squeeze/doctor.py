"""`squeeze targets check NAME`: a tiny model through a target's whole path, step by step.

Each step passes, fails (with its message) or is skipped as not applicable here; a failed step skips the
steps that need it. TVM targets: runtime importable, compile, cross-compile (ELF machine), nvcc (CUDA
without a GPU), device/connect, run, numerics vs ONNX Runtime on the host, latency measured and labelled.
The check compiles untuned: tuning takes minutes, and the first measurement of a model tunes it.
"""

from __future__ import annotations

import gc
import glob
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

from squeeze.errors import SqueezeError, first_line
from squeeze.target import Target

__all__ = ["Step", "CheckReport", "check_target", "find_nvcc"]

Status = Literal["pass", "fail", "skip"]
INPUT_SHAPE = (1, 3, 16, 16)  # small: one inference on an emulated board takes well under a second


@dataclass
class Step:
    name: str
    status: Status
    detail: str


@dataclass
class CheckReport:
    target: str
    steps: list[Step] = field(default_factory=list)

    @property
    def failure(self) -> Step | None:
        return next((s for s in self.steps if s.status == "fail"), None)

    @property
    def passed(self) -> bool:
        return self.failure is None

    def to_json(self) -> dict:
        return {"target": self.target, "passed": self.passed, "steps": [asdict(s) for s in self.steps]}


class _Steps:
    """Runs steps in order; after a failure, later steps are skipped."""

    def __init__(self, report: CheckReport) -> None:
        self.report = report

    def skip(self, name: str, why: str) -> None:
        self.report.steps.append(Step(name, "skip", why))

    def run(self, name: str, fn: Callable[[], str]) -> bool:
        if not self.report.passed:
            self.skip(name, f"not run: `{self.report.failure.name}` failed")
            return False
        try:
            self.report.steps.append(Step(name, "pass", fn()))
            return True
        except SqueezeError as exc:
            self.report.steps.append(Step(name, "fail", exc.message))
        except Exception as exc:  # a step's library failed in a way squeeze does not know: report, don't crash
            self.report.steps.append(Step(name, "fail", first_line(exc, 400)))
        return False


def _tiny_artifact():
    """conv-BN-ReLU, depthwise conv, pooling, linear: the layer kinds of real CNNs, at 16x16."""
    import torch
    from torch import nn

    from squeeze.export.onnx import export_onnx
    from squeeze.model.loading import LoadedModel

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                           nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    return export_onnx(LoadedModel("check-tiny", "factory", INPUT_SHAPE, module), exporter="torchscript")


def find_nvcc() -> str | None:
    """nvcc on PATH, else the newest /usr/local/cuda*/bin/nvcc."""
    found = shutil.which("nvcc")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return candidates[-1] if candidates else None


def _latency_step(artifact, target: Target) -> str:
    from squeeze.measure.bench import measure
    from squeeze.measure.protocol import Protocol

    protocol = Protocol.for_target(target, repeat=5, warmup=2, min_repeat_ms=5)
    (m,) = measure([artifact], target, protocol, use_cache=False)
    env = m.environment
    marks = [label for flag, label in (("untuned", "untuned"), ("emulated", "emulated (not ARM latency)"))
             if env.get(flag)]
    return (f"median {m.stats.median_ms:.3f} ms, {m.stats.n} samples on {', '.join(env['providers'])}"
            + (f"; labelled: {', '.join(marks)}" if marks else ""))


def _check_onnxruntime(target: Target, steps: _Steps) -> None:
    from squeeze.measure.runtimes import get_runtime

    runtime = get_runtime(target)
    steps.run("runtime", lambda: f"onnxruntime {runtime.version()} with {', '.join(runtime.providers(target))}")
    box = {}

    def export() -> str:
        box["artifact"] = art = _tiny_artifact()
        return f"ONNX export, max abs err vs torch {art.parity.max_abs_err:.2e}"

    steps.run("export", export)
    steps.run("latency", lambda: _latency_step(box["artifact"], target))


def _check_tvm(target: Target, steps: _Steps) -> None:
    from squeeze.export import tvm as tx

    def importable() -> str:
        tvm = tx.import_tvm()
        return f"apache-tvm {tvm.__version__}, apache-tvm-ffi {tx._installed('apache-tvm-ffi')} (pin {tx.FFI_PIN})"

    if not steps.run("TVM importable", importable):
        return
    from squeeze.measure import tvm as mt

    # The check compiles untuned (tuning takes minutes); the label says so on the latency step.
    untuned = target.model_copy(update={"tvm": target.tvm.model_copy(update={"tuning": "none", "tuning_trials": 0})})
    box: dict = {}

    def export() -> str:
        box["artifact"] = art = _tiny_artifact()
        return f"ONNX export, max abs err vs torch {art.parity.max_abs_err:.2e}"

    steps.run("export", export)
    mode = mt.runner_mode(target)
    if target.tvm.tuning == "metaschedule" and target.emulated:
        steps.skip("tuning", "never on an emulated board: its timings say nothing about the device")
    elif target.tvm.tuning == "metaschedule":
        steps.skip("tuning", f"not run by the check (minutes); the first measurement of a model tunes it "
                             f"({target.tvm.tuning_trials} trials per layer, reused from the database)")
    if mode == "compile-only" and target.device == "cuda":
        _check_cuda_compile_only(target, steps, box)
        return

    def compile_() -> str:
        box["lib"] = lib = tx.build_library(box["artifact"], untuned, 1, tune=False)
        return f"{tx.resolve_target(target).kind.name} library {lib.path.stat().st_size // 1024} KB ({lib.path.name})"

    # A board is connected before compiling: reaching it needs no compiler, and an unreachable board is the
    # first thing to know (a missing cross-compiler must not hide it).
    if mode == "rpc":
        # The boards behind a tracker's key, seen while this check holds one of them.
        if steps.run("connect", lambda: _device_step(target, box)) and target.tvm.rpc.tracker:
            steps.run("boards", lambda: mt.fleet(target.tvm.rpc).describe())
    steps.run("compile", compile_)
    if target.tvm.cross_compiler:
        def elf() -> str:
            want, got = tx.expected_elf_machine(tx.resolve_target(target)), tx.elf_machine(box["lib"].path)
            names = {v: k for k, v in tx.ELF_MACHINES.items()}
            if got is None or (want is not None and got != want):
                raise SqueezeError(f"The cross-compiled library is {'not ELF' if got is None else f'ELF machine {got}'}"
                                   f", expected {names.get(want, want)} ({want}).", "Check `tvm.cross_compiler`.")
            return f"{target.tvm.cross_compiler}: {names.get(got, got)} ELF (e_machine {got})"

        steps.run("cross-compile", elf)
    else:
        steps.skip("cross-compile", "not applicable: the target compiles for this machine")
    if mode == "compile-only":
        steps.skip("run", "compile-only: nothing runs, no latency is claimed")
        return
    if mode != "rpc":
        steps.run("device", lambda: _device_step(target, box))
    steps.run("run", lambda: _run_step(target, box))
    steps.run("numerics vs ORT", lambda: _parity_step(box))
    artifact = box.get("artifact")
    box.clear()  # drop the remote handles: an rpc_server serves one session at a time
    gc.collect()
    steps.run("latency", lambda: _latency_step(artifact, untuned))


def _device_step(target: Target, box: dict) -> str:
    from squeeze.export.tvm import device_kind, import_tvm
    from squeeze.measure.tvm import connect

    kind = device_kind(target)
    if target.tvm.runner == "rpc":
        t0 = time.perf_counter()
        box["remote"] = remote = connect(target)
        box["dev"] = remote.device(kind, 0)
        return f"{target.tvm.rpc.address}: session in {time.perf_counter() - t0:.1f} s, remote {kind}(0) " \
               f"{'present' if box['dev'].exist else 'MISSING'}" + (" (emulated board)" if target.emulated else "")
    box["dev"] = import_tvm().device(kind, 0)
    return f"{kind}(0) here"


def _run_step(target: Target, box: dict) -> str:
    import numpy as np

    from squeeze.export.tvm import import_tvm
    from squeeze.measure.tvm import first_output

    tvm = import_tvm()
    from tvm import relax

    lib, remote, dev = box["lib"], box.get("remote"), box["dev"]
    if remote is None:
        module = tvm.runtime.load_module(str(lib.path))
    else:
        remote.upload(str(lib.path), target=lib.path.name)
        module = remote.load_module(lib.path.name)
    box["x"] = x = np.random.default_rng(0).standard_normal(INPUT_SHAPE, dtype=np.float32)
    vm = relax.VirtualMachine(module, dev)
    t0 = time.perf_counter()
    box["out"] = out = first_output(vm["main"](tvm.runtime.tensor(x, dev)))
    return f"output {tuple(out.shape)} in {1e3 * (time.perf_counter() - t0):.1f} ms (one call, from here)"


def _parity_step(box: dict) -> str:
    from squeeze.export.artifact import compare_outputs
    from squeeze.measure.tvm import ort_reference

    p = compare_outputs(box["out"], ort_reference(box["artifact"], box["x"]))
    if not p.passed:
        raise SqueezeError(f"TVM's output differs from ONNX Runtime on the host: max abs err {p.max_abs_err:.3g} "
                           f"(atol {p.atol}, rtol {p.rtol}).", "Check the target's `tvm.target`.")
    return f"max abs err {p.max_abs_err:.2e} (atol {p.atol}, rtol {p.rtol})"


def _check_cuda_compile_only(target: Target, steps: _Steps, box: dict) -> None:
    from squeeze.export import tvm as tx

    def codegen() -> str:
        box["source"] = src = tx.generate_cuda_source(box["artifact"], target)
        kernels = src.count("__global__")
        arch = tx.resolve_target(target).attrs.get("arch")
        return f"{kernels} CUDA kernels for {arch} ({len(src) // 1024} KB source)"

    steps.run("compile", codegen)
    nvcc = find_nvcc()
    if nvcc is None:
        steps.skip("nvcc", "no nvcc here (PATH, /usr/local/cuda*/bin): the generated source was not compiled")
    else:
        steps.run("nvcc", lambda: _nvcc_step(nvcc, box["source"], str(tx.resolve_target(target).attrs.get("arch"))))
    steps.skip("run", "compile-only: no GPU here, nothing runs and no latency is claimed")


def _nvcc_step(nvcc: str, source: str, arch: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        cu, cubin = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.cubin"
        cu.write_text(source)
        r = subprocess.run([nvcc, "--cubin", f"-arch={arch}", str(cu), "-o", str(cubin)], capture_output=True,
                           text=True, timeout=600)
        if r.returncode != 0:
            raise SqueezeError(f"nvcc could not compile the generated CUDA source: {r.stderr.strip()[:400]}",
                               "Report the model and target; the code generation step passed.")
        return f"{nvcc} -arch={arch}: {cubin.stat().st_size // 1024} KB cubin"


def check_target(target: Target) -> CheckReport:
    report = CheckReport(target.name)
    steps = _Steps(report)
    if target.runtime == "tvm":
        _check_tvm(target, steps)
    else:
        _check_onnxruntime(target, steps)
    return report
