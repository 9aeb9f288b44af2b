import os
import stat

from squeeze.util.cache import atomic_write_bytes


def test_atomic_write_gives_the_file_the_umasks_mode_not_a_private_temp_files(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "out" / "report.json", b"{}")
    finally:
        os.umask(old)
    path = tmp_path / "out" / "report.json"
    assert path.read_bytes() == b"{}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no temp file left
