"""ONNX Runtime sessions, opened one way everywhere: parity checks, evaluation, calibration, profiling, timing.

A failure must arrive as the exception squeeze words for the user, never as ORT's own log line on stderr, so
every session logs fatal errors only. Anything else a caller needs (threads, profiling, optimisation level)
is a `SessionOptions` attribute passed by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["open_session", "run_batched"]

CPU = ("CPUExecutionProvider",)


def open_session(model: str | Path | bytes | Any, providers: Sequence[str] = CPU,
                 config: dict[str, str] | None = None, **options: Any):
    """An `onnxruntime.InferenceSession` of `model` (a path, serialized bytes, or anything with a `.path`),
    with `options` set on its SessionOptions (e.g. `intra_op_num_threads=1`, `enable_profiling=True`) and
    `config` added as session config entries (`{"session.intra_op.allow_spinning": "0"}`)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: a failure arrives as the exception, not a log line
    for name, value in options.items():
        setattr(so, name, value)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    source = model if isinstance(model, bytes) else str(getattr(model, "path", model))
    return ort.InferenceSession(source, so, providers=list(providers))


def run_batched(model: str | Path | bytes | Any, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The first output of `model` on `inputs` (N, ...), run on the CPU in batches."""
    sess = open_session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: inputs[i:i + batch_size]})[0]
                           for i in range(0, len(inputs), batch_size)])
