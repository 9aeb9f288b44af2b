"""Writing a command's outputs all-or-nothing: staged in a temp folder, then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from squeeze.errors import SqueezeError

__all__ = ["check_out_dir", "write_outputs"]


def check_out_dir(out_dir: Path) -> Path:
    """Fail before any work when the output folder cannot be used."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SqueezeError(f"--out {out_dir} is an existing file, not a folder.", "Name a folder (it is created).")
    return out_dir


def write_outputs(out_dir: Path, files: dict[str, bytes | Path]) -> list[Path]:
    """Write every file or none: each is staged next to the folder, then renamed (atomic per file)."""
    out_dir = check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix=".squeeze-", dir=out_dir) as tmp:
        staged = {}
        for name, content in files.items():
            p = Path(tmp) / name
            if isinstance(content, Path):
                shutil.copyfile(content, p)
            else:
                p.write_bytes(content)
            staged[name] = p
        for name, p in staged.items():
            os.replace(p, out_dir / name)
            written.append(out_dir / name)
    return written
