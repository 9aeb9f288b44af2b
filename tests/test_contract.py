"""The contract every registered method keeps, checked for each name the registry holds (a new method is in
this matrix the moment it registers): it runs end to end on a small trained net through `squeeze.api.compress`
on a deterministic runtime, exports an ONNX file that runs, and a pruned result's checkpoint replays its plan on
the original architecture to the same outputs as the exported file.

The runtime is `tests/plugins/squeeze_fakert`, a real runtime plugin: the measurement worker finds it through
its entry point, as it would a third-party one, and its readings are a fixed function of the weights' bytes.
"""

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest

from squeeze import api
from squeeze.errors import SqueezeError
from squeeze.export.ort import run_batched
from squeeze.measure.protocol import Protocol
from squeeze.measure.runtimes import runtime_registry
from squeeze.methods import get_pass, pass_registry
from squeeze.model.loading import load_model
from squeeze.quant.run import NotFasterError
from squeeze.recipe import Budget
from squeeze.target import load_target

PLUGINS = Path(__file__).parent / "plugins"
QUICK_MEASURE = {"repeat": 3, "warmup": 0, "min_repeat_ms": 0}


@pytest.fixture(scope="module")
def fake_target(tmp_path_factory):
    """A CPU target on the fake runtime; the worker process sees the plugin through PYTHONPATH."""
    patch = pytest.MonkeyPatch()
    patch.syspath_prepend(str(PLUGINS))
    patch.setenv("PYTHONPATH", str(PLUGINS))
    for attr in ("_items", "_owners"):  # the fake runtime is registered for these tests only
        patch.setattr(runtime_registry, attr, dict(getattr(runtime_registry, attr)))
    runtime_registry.load_plugins(importlib.metadata.entry_points(group="squeeze.runtimes", name="fake"))
    path = tmp_path_factory.mktemp("targets") / "fake-cpu.yaml"
    path.write_text("name: fake-cpu\nruntime: fake\ndevice: cpu\nproviders: [fake]\n"
                    "protocol: {warmup: 0, repeat: 3, min_repeat_ms: 0}\n")
    yield path
    patch.undo()


@pytest.mark.slow
def test_the_fake_runtime_is_deterministic_and_sees_size(fake_target, tmp_path):
    """What the matrix relies on: the same file reads the same, and a model with fewer weights reads faster."""
    report = api.compress("zoo:digits-cnn", tmp_path / "p", "prune.uniform", target=str(fake_target),
                          budget=Budget(macs_ratio=0.5), options=get_pass("prune.uniform").smoke_options,
                          measure=QUICK_MEASURE)
    target, protocol = load_target(str(fake_target)), Protocol(warmup=0, repeat=3, min_repeat_ms=0)
    first, second = (api.bench(["zoo:digits-cnn", str(tmp_path / "p" / "model.pt")], target, api.ModelOptions(),
                               protocol, use_cache=False) for _ in range(2))
    assert [r.measurement.stats.median_ms for r in first] == [r.measurement.stats.median_ms for r in second]
    assert first[1].measurement.stats.median_ms < first[0].measurement.stats.median_ms
    assert report["latency"]["speedup"]["ratio"] > 1


def _target_for(cls, fake_target: Path) -> str:
    """The fake runtime where the method takes any runtime; else the real one it is written for, on this CPU."""
    return str(fake_target) if cls.runtimes is None else "host-cpu"


@pytest.mark.parametrize("name", pass_registry.names())
def test_every_registered_method_keeps_the_contract(name, fake_target, tmp_path):
    cls = get_pass(name)
    out = tmp_path / "out"
    target = _target_for(cls, fake_target)
    run = lambda: api.compress(  # noqa: E731
        "zoo:digits-cnn", out, name, target=target, data="digits", options=cls.smoke_options,
        budget=Budget(**cls.smoke_budget) if cls.needs_budget else None, measure=QUICK_MEASURE)
    if "cpu" not in cls.devices:
        # A method for other devices refuses a CPU target with a message, before any work.
        with pytest.raises(SqueezeError) as refused:
            run()
        assert Path(target).stem in str(refused.value) and not out.exists()
        return
    try:
        report = run()
    except NotFasterError as refused:
        # A method for the real runtime gets this CPU's verdict: where int8 is not faster now, it refuses and
        # writes nothing (the contract for that outcome); the rest of the contract needs a faster CPU.
        assert "Nothing was written" in str(refused) and not out.exists()
        pytest.skip(f"{name} is not faster than fp32 on this CPU now, and its refusal wrote nothing")
    assert json.loads((out / "report.json").read_text())["stages"][0]["method"] == name
    onnx_file = out / "model.onnx"
    x = np.random.default_rng(0).standard_normal((8, 1, 16, 16)).astype(np.float32)
    logits = run_batched(onnx_file, x)
    assert logits.shape == (8, 10) and np.isfinite(logits).all()
    assert report["stages"][0]["record"] is not None
    if (out / "model.pt").exists():
        # The checkpoint holds the architecture and a replayable plan, no pickle: it loads to the exported model.
        import torch

        replayed = load_model(str(out / "model.pt"))
        assert replayed.plans, "a checkpoint is written only for a result that carries a plan"
        with torch.no_grad():
            ref = replayed.module.eval()(torch.from_numpy(x)).numpy()
        if not any(s["method"].startswith("quant.") for s in report["stages"]):
            np.testing.assert_allclose(logits, ref, rtol=1e-3, atol=1e-4)


TOY = '''"""A toy search: keeps every channel and says so."""

from squeeze.methods.base import Pass, register_pass
from squeeze.methods.prune import PruneOptions


@register_pass
class ToyPass(Pass):
    name = "prune.toy"
    summary = "A toy search that keeps every channel."
    Options = PruneOptions
    needs_budget = True

    def run(self, state, ctx):
        return state, {"search": "toy"}
'''


@pytest.mark.slow
def test_a_new_method_is_one_module_and_nothing_else(tmp_path):
    """Adding a method is one file under squeeze/methods/: the CLI, `squeeze list`, recipe validation and this
    contract matrix see it with no other edit (checked on a copy of the package with the one file added)."""
    import os
    import shutil
    import subprocess
    import sys

    import squeeze

    tree = tmp_path / "src"
    shutil.copytree(Path(squeeze.__file__).parent, tree / "squeeze", ignore=shutil.ignore_patterns("__pycache__"))
    (tree / "squeeze" / "methods" / "prune" / "toy.py").write_text(TOY)
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "200"}

    def run(*args):
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, cwd=tmp_path,
                              timeout=600)

    assert "prune.toy" in run("-m", "squeeze", "list", "methods").stdout
    assert "toy" in run("-m", "squeeze", "prune", "--help").stdout
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("name: toy\nbudget: {macs_ratio: 0.5}\nstages:\n  - method: prune.toy\n")
    checked = run("-m", "squeeze", "validate", str(recipe))
    assert checked.returncode == 0, checked.stderr
    matrix = run("-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-k", "contract and toy")
    assert "1 passed" in matrix.stdout, matrix.stdout[-2000:]


def _cpu_target(runtime: str, fake_target: Path) -> str:
    """A shipped target on this machine's CPU that uses `runtime` (the fake one for the fake runtime)."""
    from squeeze.target import list_targets

    if runtime == "fake":
        return str(fake_target)
    shipped = [t for t in list_targets() if t.runtime == runtime and t.device == "cpu"]
    if not shipped:
        pytest.skip(f"no shipped target runs `{runtime}` on this machine's CPU")
    return shipped[0].name


@pytest.mark.parametrize("runtime", runtime_registry.names())
def test_every_registered_runtime_keeps_the_protocol(runtime, fake_target):
    """Each runtime times two artifacts interleaved under the declared protocol: every sample is there, the
    environment names the runtime that ran, and the protocol travels with the figures."""
    from squeeze.errors import RuntimeUnavailableError
    from squeeze.export.onnx import export_onnx
    from squeeze.measure.bench import measure

    target = load_target(_cpu_target(runtime, fake_target))
    if target.tvm is not None:  # the protocol, not tuning (minutes), is under test
        target = target.model_copy(update={"tvm": target.tvm.model_copy(update={"tuning": "none",
                                                                               "tuning_trials": 0})})
    model = load_model("testnets:tiny_cnn", input_shape=(1, 3, 16, 16))
    artifact = export_onnx(model)
    protocol = Protocol(warmup=1, repeat=5, min_repeat_ms=0)
    try:
        measured = measure([artifact, artifact], target, protocol, use_cache=False)
    except RuntimeUnavailableError as exc:  # an optional runtime not installed here: it says how to get it
        assert "pip install" in str(exc) or "install" in str(exc.hint if hasattr(exc, "hint") else exc)
        pytest.skip(f"{runtime} is not installed here: {exc}")
    assert len(measured) == 2 and measured[0].run_id == measured[1].run_id
    for m in measured:
        assert m.stats.n == len(m.samples_ms) == 5 and m.stats.median_ms > 0 and not m.cached
        assert m.environment["runtime"] == runtime and m.protocol["repeat"] == 5
