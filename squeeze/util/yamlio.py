"""YAML loading with pydantic validation errors that name the file, the key path and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from squeeze.errors import SqueezeError

__all__ = ["load_yaml_model", "format_validation_error"]

M = TypeVar("M", bound=pydantic.BaseModel)


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """Follow a pydantic `loc` through the composed YAML tree; return the 1-based line of the deepest hit."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            nxt = node.value[key]
        else:
            nxt = None
        if nxt is None:
            break
        node, line = nxt, nxt.start_mark.line + 1
    return line


def format_validation_error(err: pydantic.ValidationError, source: str, root: yaml.Node | None) -> str:
    parts = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        line = _line_of(root, e["loc"])
        where = f"{source}:{line}" if line else source
        parts.append(f"{where}: `{path}`: {e['msg']}")
    return "; ".join(parts)


def load_yaml_model(path: Path, model: type[M], error: type[SqueezeError], what: str) -> M:
    """Parse `path` as YAML and validate it as `model`; any problem raises `error` with a fix hint."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise error(f"Cannot read the {what} file {path}: {exc.strerror}.", "Check the path.") from exc
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise error(f"The {what} file {path} is not valid YAML: {exc}.", "Fix the syntax at that line.") from exc
    if data is None:
        raise error(f"The {what} file {path} is empty{' (only comments)' if text.strip() else ''}.",
                    f"Write the {what} as a YAML mapping of key: value pairs.")
    if not isinstance(data, dict):
        raise error(f"The {what} file {path} must be a YAML mapping (key: value), not a {type(data).__name__}.",
                    "Write key: value pairs at the top level.")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise error(
            f"Invalid {what} {format_validation_error(exc, str(path), root)}.",
            f"Fix the value(s) named above in {path.name}.",
        ) from exc
