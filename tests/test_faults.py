"""Faults on a bad day: Ctrl-C, a full disk, unwritable or occupied output locations, data that does not fit
the model. Each gets one paragraph, a non-zero exit code, and leaves nothing behind."""

import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import file_digest
from test_cli import assert_clean_error

FAST = ["--repeat", "5", "--warmup", "2", "--min-repeat-ms", "2"]
PRUNE = ["prune", "zoo:digits-cnn", "--method", "uniform", "--macs", "0.7x"]


def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds `marker` (the command and every worker it started)."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in env.read_bytes():
                found.append(int(env.parent.name))
        except OSError:
            pass  # gone meanwhile, or not ours to read
    return found


def _worker_started(marker: str) -> bool:
    for pid in _processes_with(marker):
        try:
            if b"squeeze.measure.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            pass
    return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc (Linux)")
@pytest.mark.parametrize("moment", ["while loading", "while measuring"])
def test_ctrl_c_at_any_moment(tmp_path, moment):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) -> exit 130, one line, no output folder,
    no worker left running."""
    marker = f"SQUEEZE_TEST_RUN={uuid.uuid4().hex}"
    out = tmp_path / "out"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    proc = subprocess.Popen([sys.executable, "-m", "squeeze", *PRUNE, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    if moment == "while loading":
        time.sleep(1.5)
    else:
        while not _worker_started(marker) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr.strip().endswith("interrupted; nothing was written.") and "Traceback" not in stderr
    assert "internal error" not in stderr and not out.exists()
    time.sleep(0.5)
    assert _processes_with(marker) == []


def test_a_full_disk_leaves_nothing(cli, tmp_path, monkeypatch):
    """Writing the outputs fails with ENOSPC (as on a full disk): exit 2, said plainly, no half-written folder."""
    import shutil

    from squeeze import outputs

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(outputs.shutil, "copyfile", full)
    out = tmp_path / "out"
    r = cli(*PRUNE, "--out", out)
    assert_clean_error(r, "the disk is full writing", "No space left on device", "nothing was written",
                       "Free some space")
    assert not out.exists() and shutil.copyfile is full


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tiny tmpfs (needs root)")
def test_a_really_full_disk(tmp_path):
    """A 64 KB tmpfs as --out's file system: the digits CNN's model.onnx (~560 KB) cannot fit."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (a container without the privilege)")
    try:
        r = subprocess.run([sys.executable, "-m", "squeeze", *PRUNE, "--out", str(disk / "out")], capture_output=True,
                           text=True, timeout=600)
        said = " ".join(r.stderr.split())
        assert r.returncode == 2 and "the disk is full" in said and "internal error" not in said, said
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_an_unwritable_json_path_fails_before_measuring(cli, tmp_path):
    r = cli("bench", "zoo:digits-cnn", *FAST, "--json", "/proc/x/out.json")
    assert_clean_error(r, "--json /proc/x/out.json cannot be written: no file can be created in /proc",
                       "Choose a location you can write to")
    r = cli("bench", "zoo:digits-cnn", *FAST, "--json", tmp_path)
    assert_clean_error(r, f"--json {tmp_path} is a folder")
    assert "latency" not in r.stdout  # nothing was measured


def test_an_occupied_out_folder_is_refused_unless_forced(cli, tmp_path, model_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.pt").write_bytes(b"an earlier result")
    before = file_digest(model_file)
    r = cli("prune", model_file, "--method", "uniform", "--macs", "0.7x", "--out", out)
    assert_clean_error(r, f"--out {out} already holds files (model.pt)", "--force")
    assert (out / "model.pt").read_bytes() == b"an earlier result" and file_digest(model_file) == before
    r = cli("prune", model_file, "--method", "uniform", "--macs", "0.7x", "--out", out, "--force")
    assert r.exit_code == 0, r.stderr
    assert (out / "model.pt").read_bytes() != b"an earlier result" and (out / "report.json").exists()


def test_data_with_more_classes_than_the_model_is_refused_before_fine_tuning(cli, tmp_path):
    out = tmp_path / "out"
    r = cli("prune", "testnets:tiny_cnn", "--input-shape", "1,3,16,16", "--method", "uniform", "--macs", "0.7x",
            "--data", "digits", "--out", out)
    assert_clean_error(r, "--data `digits` has 10 classes but the model has 4 outputs", "labels 4..9")
    assert not out.exists()
