"""A measurement worker: a fresh process that opens the artifacts once and times them on request.

Why a process: runtimes hold process-wide state that decides latency (ONNX Runtime's thread pools,
TVM's device API), a crash in a runtime must not take the user's process down, and the worker imports
no torch, so it starts in about a second. It is started as `python -m squeeze.measure.worker` (not with
multiprocessing's spawn, which would re-import the caller's main script) and speaks length-prefixed
pickle frames over its stdin/stdout; both ends are squeeze's own code.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

from squeeze.errors import SqueezeError

__all__ = ["WorkerClient", "WorkerError"]

_HEADER = struct.Struct("<Q")


class WorkerError(SqueezeError):
    pass


def _send(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _recv(stream: IO[bytes]) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError
    (size,) = _HEADER.unpack(head)
    return pickle.loads(stream.read(size))


def _sample(session, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        session.run()
    return (time.perf_counter() - t0) * 1e3 / calls


def _calibrate(session, warmup: int, min_repeat_ms: float) -> int:
    """Warm up, then pick how many calls make one sample last at least `min_repeat_ms`."""
    for _ in range(max(warmup, 1)):
        session.run()
    one_ms = _sample(session, 1)
    return max(1, int(min_repeat_ms / max(one_ms, 1e-3)) + 1)


def _serve(inp: IO[bytes], out: IO[bytes]) -> None:
    artifacts, target, protocol = _recv(inp)
    try:
        from squeeze.measure.environment import environment
        from squeeze.measure.runtimes import get_runtime

        runtime = get_runtime(target)
        runtime.configure_process(protocol)
        sessions = [runtime.open(a, target, protocol) for a in artifacts]
        calls = [_calibrate(s, protocol.warmup, protocol.min_repeat_ms) for s in sessions]
        env = environment(runtime.name, runtime.version(), runtime.providers(target), protocol.threads)
        _send(out, ("ready", {"calls": calls, "environment": env}))
        while (order := _recv(inp)) is not None:
            _send(out, ("samples", {i: _sample(sessions[i], calls[i]) for i in order}))
    except (BrokenPipeError, EOFError):
        return  # the parent is gone: nobody to report to
    except BaseException as exc:  # everything else goes back to the parent, which raises it there
        payload = exc if isinstance(exc, SqueezeError) else WorkerError(
            f"The measurement on `{target.name}` failed: {type(exc).__name__}: {exc}.",
            "Check that the model runs on this runtime; re-run with --debug for details.\n" + traceback.format_exc(),
        )
        _send(out, ("error", payload))


class WorkerClient:
    def __init__(self, artifacts, target, protocol) -> None:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # importable even when squeeze is not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen([sys.executable, "-m", "squeeze.measure.worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env)
        _send(self._proc.stdin, (artifacts, target, protocol))
        self.ready: dict[str, Any] = self._recv("ready")

    def _recv(self, kind: str) -> Any:
        try:
            tag, payload = _recv(self._proc.stdout)
        except EOFError:
            code = self._proc.wait(10)
            raise WorkerError(
                f"The measurement process died (exit code {code}) before reporting; the runtime crashed or ran "
                "out of memory.",
                "Re-run with --debug; try fewer or smaller models.",
            ) from None
        if tag == "error":
            self.close()
            raise payload
        assert tag == kind, f"worker protocol: expected {kind}, got {tag}"
        return payload

    def sample(self, order: list[int]) -> dict[int, float]:
        _send(self._proc.stdin, order)
        return self._recv("samples")

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                _send(self._proc.stdin, None)
            except (BrokenPipeError, OSError):
                pass  # already gone
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        for stream in (self._proc.stdin, self._proc.stdout):
            stream.close()


if __name__ == "__main__":
    # Frames go to the real stdout; anything a library prints goes to stderr instead.
    frames_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _serve(sys.stdin.buffer, frames_out)
