"""Locate the data files shipped with squeeze (targets/*.yaml, recipes/*.yaml).

In a wheel they live in `squeeze/_data/`; in a source checkout they are at the repository top level.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["data_dir"]

_PACKAGE = Path(__file__).resolve().parent.parent  # squeeze/


def data_dir(kind: str) -> Path:
    """`kind` is "targets" or "recipes"."""
    installed = _PACKAGE / "_data" / kind
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / kind
