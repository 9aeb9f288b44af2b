"""Registered passes. Importing this package registers the built-in ones."""

from squeeze.passes import builtin, prune  # noqa: F401  (registers export.onnx, measure.latency, prune.*)
from squeeze.passes.base import ModelState, Pass, PassContext, PassOptions, get_pass, list_passes, register_pass

__all__ = ["ModelState", "Pass", "PassContext", "PassOptions", "get_pass", "list_passes", "register_pass"]
