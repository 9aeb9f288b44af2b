import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from squeeze.resources import data_dir

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
