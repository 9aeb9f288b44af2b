"""The example CI workflow works as written: its shell steps, run here on two small models laid out as the
workflow's checkouts (NEW in the work folder, OLD in base/), pass an unchanged model and fail a slower one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "ci" / "latency-gate.yml"


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _local_steps(workflow: dict) -> list[dict]:
    """The steps a local run can execute: shell steps, less the install (squeeze is installed here)."""
    steps = workflow["jobs"]["gate"]["steps"]
    return [s for s in steps if "run" in s and not s["name"].startswith("install")]


def test_the_workflow_is_well_formed():
    wf = _workflow()
    steps = wf["jobs"]["gate"]["steps"]
    names = [s.get("name") or s["uses"] for s in steps]
    assert names[:3] == ["actions/checkout@v4", "actions/checkout@v4", "actions/setup-python@v5"]
    assert steps[1]["with"]["path"] == "base" and "base_ref" in steps[1]["with"]["ref"]
    install = next(s["run"] for s in steps if s.get("name", "").startswith("install"))
    # A CPU torch, pinned, from PyTorch's CPU index, before squeeze (which would otherwise pull a CUDA build).
    assert install.index("TORCH_INDEX") < install.index("SQUEEZE_REQUIREMENT")
    assert wf["env"]["TORCH_REQUIREMENT"] == "torch==2.13.0" and wf["env"]["TORCH_INDEX"].endswith("/cpu")
    assert "pip install ." not in WORKFLOW.read_text() and "train.py" not in WORKFLOW.read_text()
    assert wf["permissions"]["pull-requests"] == "write"
    for s in _local_steps(wf):
        assert "${{" not in s["run"]  # shell steps read env variables only: runnable outside GitHub


def _model(path: Path, layers: int) -> None:
    import testnets
    from squeeze.export.onnx import export_onnx
    from squeeze.model.loading import LoadedModel

    art = export_onnx(LoadedModel(f"stack{layers}", "factory", (1, 3, 24, 24), testnets.conv_stack(layers, 32)))
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(art.path, path)


def _run_steps(work: Path) -> list[subprocess.CompletedProcess]:
    wf = _workflow()
    env = {**os.environ, **{k: str(v) for k, v in wf["env"].items()},
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
    results = []
    for step in _local_steps(wf):
        r = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=work, env=env, capture_output=True, text=True,
                           timeout=600)
        results.append(r)
        if r.returncode != 0:
            break
    return results


@pytest.mark.parametrize("new_layers, verdict, code", [(4, "pass", 0), (12, "fail", 1)], ids=["same", "3x-slower"])
def test_the_workflow_gates_two_models(tmp_path, new_layers, verdict, code):
    _model(tmp_path / "model.onnx", new_layers)
    _model(tmp_path / "base" / "model.onnx", 4)
    build, gate = _run_steps(tmp_path)
    assert build.returncode == 0, build.stderr
    assert gate.returncode == code, gate.stdout + gate.stderr
    result = json.loads((tmp_path / "gate" / "gate.json").read_text())
    assert result["verdict"] == verdict and (tmp_path / "gate" / "exit-code").read_text().strip() == str(code)
