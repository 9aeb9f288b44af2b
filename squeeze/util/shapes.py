"""Input shapes as the command line writes them. No torch import: every command parses its flags with this."""

from __future__ import annotations

import re

from squeeze.errors import InputShapeError

__all__ = ["parse_input_shape"]


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,3,224,224' or '1x3x224x224' -> (1, 3, 224, 224)."""
    if text is None:
        return None
    try:
        dims = tuple(int(d) for d in re.split(r"[,x ]+", text.strip()) if d)
    except ValueError:
        dims = ()
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise InputShapeError(
            f"`--input-shape {text}` is not a shape.",
            "Give positive integers separated by commas, batch first, e.g. --input-shape 1,3,224,224.",
        )
    return dims
