import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from squeeze.util.resources import data_dir

ROOT = Path(__file__).resolve().parents[1]


def test_data_dirs_resolve_in_checkout():
    assert (data_dir("targets") / "host-cpu.yaml").is_file()
    assert (data_dir("recipes") / "bench-host.yaml").is_file()


@pytest.mark.slow
def test_wheel_ships_targets_and_recipes(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {p.name for p in (ROOT / "targets").glob("*.yaml")} | {p.name for p in (ROOT / "recipes").glob("*.yaml")}
    assert shipped and shipped <= {Path(n).name for n in names if n.startswith("squeeze/_data/")}


CROSS_TESTS = ["tests/test_tvm.py::test_cross_compiled_library_is_an_aarch64_elf",
               "tests/test_tvm_rpc.py::test_nothing_listening", "tests/test_tvm_rpc.py::test_wrong_key_with_a_real_tracker"]


def test_a_machine_without_the_cross_compiler_skips_not_fails():
    """The suite on a fresh machine: aarch64-linux-gnu-g++ hidden from PATH, the test that cross-compiles
    skips (naming the package), and the board error tests, which never need it, pass."""
    pytest.importorskip("tvm", reason="the tvm extra is not installed (pip install 'squeeze[tvm]')")
    from conftest import CROSS_COMPILER

    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / CROSS_COMPILER).exists())
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CROSS_TESTS],
                       cwd=ROOT, env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    assert "2 passed, 1 skipped" in r.stdout and "apt-get install g++-aarch64-linux-gnu" in r.stdout
