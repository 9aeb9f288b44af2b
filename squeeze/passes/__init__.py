"""Registered passes. Importing this package registers the built-in ones."""

from squeeze.passes import builtin, prune  # noqa: F401  (registers export.onnx, measure.latency, prune.*)
from squeeze.passes import quant  # noqa: F401  (registers quant.int8, quant.fp16, quant.qat)
from squeeze.passes import haq  # noqa: F401  (registers quant.haq)
from squeeze.passes.base import (ModelState, Pass, PassContext, PassOptions, get_pass, list_passes, pass_registry,
                                 register_pass)

__all__ = ["ModelState", "Pass", "PassContext", "PassOptions", "get_pass", "list_passes", "pass_registry",
           "register_pass"]
