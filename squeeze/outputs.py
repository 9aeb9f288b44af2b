"""Writing a command's outputs all-or-nothing: staged in a temp folder, then renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from squeeze.errors import SqueezeError

__all__ = ["check_out_dir", "check_writable", "write_outputs", "remove_unfinished", "partial_dir"]

_unfinished: set[Path] = set()  # output folders (or staging folders) being written right now


def remove_unfinished() -> None:
    """What an interrupted process must not leave behind (called from the Ctrl-C handler)."""
    for path in list(_unfinished):
        shutil.rmtree(path, ignore_errors=True)


def partial_dir(out_dir: Path) -> Path:
    """Where a resumable search keeps a run's progress: `<out>.partial`, next to the output folder and outside
    its all-or-nothing staging, so that Ctrl-C or a crash leaves it for `--resume` (squeeze.prune.resume)."""
    out_dir = Path(out_dir).absolute()
    return out_dir.with_name(f"{out_dir.name}.partial")


def check_out_dir(out_dir: Path, force: bool = False) -> Path:
    """Fail before any work when the output folder cannot be used: a file, a folder that already holds
    files (unless `force`: then the files this command writes are replaced), or one that cannot be created."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise SqueezeError(f"--out {out_dir} is an existing file, not a folder.", "Name a folder (it is created).")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held and not force:
        listed = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise SqueezeError(f"--out {out_dir} already holds files ({listed}); squeeze does not overwrite a result "
                           "unasked.", "Name a new folder, or add --force to replace the files this command writes.")
    check_writable(out_dir / ".squeeze-probe", "--out")
    return out_dir


def check_writable(path: Path, flag: str) -> None:
    """Fail before any work when `path` could not be written: it must not be a folder, and a file must be
    creatable in its nearest existing parent (tried: permission bits say nothing for root or /proc)."""
    path = Path(path)
    if path.is_dir():
        raise SqueezeError(f"{flag} {path} is a folder; it names a file to write.", "Give a file name.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".squeeze-probe-", dir=parent)
    except OSError as exc:
        raise SqueezeError(f"{flag} {path} cannot be written: no file can be created in {parent} ({exc.strerror}).",
                           "Choose a location you can write to.") from None
    os.close(fd)
    os.unlink(probe)


def write_outputs(out_dir: Path, files: dict[str, bytes | Path], force: bool = False) -> list[Path]:
    """Write every file or none: each is staged next to the folder, then renamed (atomic per file). A folder
    this call created is removed again when writing fails (a full disk, Ctrl-C)."""
    out_dir = check_out_dir(out_dir, force)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    pending = out_dir if created else None
    try:
        with tempfile.TemporaryDirectory(prefix=".squeeze-", dir=out_dir) as tmp:
            pending = pending or Path(tmp)
            _unfinished.add(pending)
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
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        _unfinished.discard(pending)
    return written
