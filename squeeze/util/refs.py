"""`package.module:function` references, as used for model factories and data functions."""

from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Any

from squeeze.errors import SqueezeError, first_line

__all__ = ["is_ref", "import_ref"]

_REF = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def is_ref(text: str) -> bool:
    return _REF.fullmatch(text) is not None


def import_ref(ref: str, error: type[SqueezeError], what: str, fix_extra: str = "") -> Any:
    """The object `ref` names; an import failure becomes `error` ("Cannot import the {what} `ref`")."""
    module_name, _, name = ref.partition(":")
    # The current folder is importable, as with `python -m` (last, so nothing installed is shadowed).
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise error(
            f"Cannot import the {what} `{ref}`: {first_line(exc)}.",
            ("Check the `package.module:function` name and that the package is importable (from the current "
             "folder, or on PYTHONPATH). "
             + fix_extra).strip(),
        ) from exc
