"""A measurement worker: a fresh process that opens the artifacts once and times them on request.

Why a process: runtimes hold process-wide state that decides latency (ONNX Runtime's thread pools,
TVM's device API), a crash in a runtime must not take the user's process down, and the worker imports
no torch, so it starts in about a second.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from typing import Any

from squeeze.errors import SqueezeError

__all__ = ["WorkerClient", "WorkerError"]


class WorkerError(SqueezeError):
    pass


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


def _serve(conn, artifacts, target, protocol) -> None:
    try:
        from squeeze.measure.environment import environment
        from squeeze.measure.runtimes import get_runtime

        runtime = get_runtime(target)
        runtime.configure_process(protocol)
        sessions = [runtime.open(a, target, protocol) for a in artifacts]
        calls = [_calibrate(s, protocol.warmup, protocol.min_repeat_ms) for s in sessions]
        env = environment(runtime.name, runtime.version(), runtime.providers(target), protocol.threads)
        conn.send(("ready", {"calls": calls, "environment": env}))
        while True:
            order = conn.recv()
            if order is None:
                return
            conn.send(("samples", {i: _sample(sessions[i], calls[i]) for i in order}))
    except (BrokenPipeError, EOFError):
        return  # the parent is gone: nobody to report to
    except BaseException as exc:  # everything else goes back to the parent, which raises it there
        payload = exc if isinstance(exc, SqueezeError) else WorkerError(
            f"The measurement on `{target.name}` failed: {type(exc).__name__}: {exc}.",
            "Check that the model runs on this runtime; re-run with --debug for details.\n" + traceback.format_exc(),
        )
        conn.send(("error", payload))


class WorkerClient:
    def __init__(self, artifacts, target, protocol) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, artifacts, target, protocol), daemon=True)
        self._proc.start()
        child.close()
        self.ready: dict[str, Any] = self._recv("ready")

    def _recv(self, kind: str) -> Any:
        try:
            tag, payload = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise WorkerError(
                f"The measurement process died (exit code {self._proc.exitcode}) before reporting; the runtime "
                "crashed or ran out of memory.",
                "Re-run with --debug; try fewer or smaller models.",
            ) from None
        if tag == "error":
            self.close()
            raise payload
        assert tag == kind, f"worker protocol: expected {kind}, got {tag}"
        return payload

    def sample(self, order: list[int]) -> dict[int, float]:
        self._conn.send(order)
        return self._recv("samples")

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass  # already gone
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()
