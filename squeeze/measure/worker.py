"""A measurement worker: a fresh process that opens the artifacts once and times them on request.

Why a process: runtimes hold process-wide state that decides latency (ONNX Runtime's thread pools,
TVM's device API), a crash in a runtime must not take the user's process down, and the worker imports
no torch, so it starts in about a second. It is started as `python -m squeeze.measure.worker` (not with
multiprocessing's spawn, which would re-import the caller's main script) and speaks length-prefixed
pickle frames over its stdin/stdout; both ends are squeeze's own code.

What the worker's long steps report (TVM tuning and compiling happen where the model is opened) comes back as
frames of their own while a reply is awaited: progress events, re-opened on the caller's reporter, and the
"squeeze" loggers' records, logged again by the caller. So a bar or a line says what a worker is doing.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import struct
import subprocess
import sys
import threading
import traceback
import weakref
from pathlib import Path
from typing import IO, Any

from squeeze.errors import SqueezeError, first_line
from squeeze.progress import reporting

__all__ = ["WorkerClient", "WorkerError", "kill_all"]

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


class _Forwarded:
    """A progress task in the worker: its events go to the caller as ("progress", ...) frames."""

    def __init__(self, send, task_id: int) -> None:
        self.send, self.task_id = send, task_id

    def advance(self, n: float = 1, **fields: object) -> None:
        self.send(("progress", ("advance", self.task_id, n, {k: str(v) for k, v in fields.items()})))

    def describe(self, description: str) -> None:
        self.send(("progress", ("describe", self.task_id, description)))


class _ForwardingReporter:
    def __init__(self, send) -> None:
        self.send, self.ids = send, itertools.count()

    def open(self, description: str, total: float | None, unit: str) -> _Forwarded:
        task = _Forwarded(self.send, next(self.ids))
        self.send(("progress", ("open", task.task_id, description, total, unit)))
        return task

    def close(self, task: _Forwarded) -> None:
        self.send(("progress", ("close", task.task_id)))


class _ForwardingHandler(logging.Handler):
    def __init__(self, send) -> None:
        super().__init__(logging.INFO)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        self.send(("log", (record.name, record.levelno, record.getMessage())))


def _sample(session, calls: int) -> float:
    return session.sample(calls)


def _calibrate(session, warmup: int, min_repeat_ms: float) -> int:
    """Warm up, then pick how many calls make one sample last at least `min_repeat_ms`. The call's time is the
    fastest of a few: one call timed during a burst of load set a model to 1-2 calls per sample while its twin
    took 60, and samples that short read several times fast on a loaded machine."""
    for _ in range(max(warmup, 1)):
        session.run()
    one_ms = min(_sample(session, 1) for _ in range(_CALIBRATION_CALLS))
    return max(1, int(min_repeat_ms / max(one_ms, 1e-3)) + 1)


_CALIBRATION_CALLS = 5


def _serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """Messages: ("open", artifacts) -> ids and calls per sample; ("sample", ids) -> ms per id;
    ("drop", ids); None -> exit. The first message is (target, protocol)."""
    target, protocol = _recv(inp)
    lock = threading.Lock()  # a runtime's own threads may report too (tuning callbacks)

    def send(frame: Any) -> None:
        with lock:
            _send(out, frame)

    logger = logging.getLogger("squeeze")
    logger.setLevel(logging.INFO)
    logger.addHandler(_ForwardingHandler(send))
    with reporting(_ForwardingReporter(send)):
        try:
            from squeeze.measure.environment import environment
            from squeeze.measure.runtimes import get_runtime

            runtime = get_runtime(target)
            runtime.configure_process(protocol)
            env = environment(runtime.name, runtime.version(), runtime.providers(target), protocol.threads)
            env.update(runtime.labels(target))
            send(("ready", {"environment": env}))
            sessions: dict[int, tuple[Any, int]] = {}  # id -> (session, calls per sample)
            next_id = 0
            while (message := _recv(inp)) is not None:
                verb, arg = message
                if verb == "open":
                    ids = list(range(next_id, next_id + len(arg)))
                    next_id += len(arg)
                    for i, artifact in zip(ids, arg):
                        session = runtime.open(artifact, target, protocol)
                        sessions[i] = (session, _calibrate(session, protocol.warmup, protocol.min_repeat_ms))
                    send(("opened", {"ids": ids, "calls": [sessions[i][1] for i in ids]}))
                elif verb == "sample":
                    send(("samples", {i: _sample(*sessions[i]) for i in arg}))
                else:  # "drop"
                    for i in arg:
                        sessions.pop(i, None)
                    send(("dropped", None))
        except (BrokenPipeError, EOFError):
            return  # the parent is gone: nobody to report to
        except BaseException as exc:  # everything else goes back to the parent, which raises it there
            payload = exc if isinstance(exc, SqueezeError) else WorkerError(
                f"The measurement on `{target.name}` failed: {first_line(exc, 400)}.",
                "Check that the model runs on this runtime; re-run with --debug for the worker's traceback.",
                detail=traceback.format_exc(),
            )
            send(("error", payload))


_live: "weakref.WeakSet[WorkerClient]" = weakref.WeakSet()


def kill_all() -> None:
    """End every worker of this process now (the Ctrl-C handler: an interrupt leaves none running)."""
    for client in list(_live):
        client.kill_process()


class WorkerClient:
    """A worker process for one target and protocol; artifacts are opened and dropped as needed, so one
    worker can serve a whole search (its start costs about a second)."""

    def __init__(self, target, protocol) -> None:
        self.protocol = protocol
        self._tasks: dict[int, tuple[Any, Any]] = {}  # the worker's open progress tasks, as the caller shows them
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])  # importable even when squeeze is not installed
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen([sys.executable, "-m", "squeeze.measure.worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, env=env,
                                      # Out of the terminal's process group: Ctrl-C is the parent's to handle (it
                                      # ends this worker); an interrupt in the worker's start-up printed a traceback.
                                      start_new_session=True)
        # An idle worker ends when its client is garbage-collected: it exits on end of input.
        weakref.finalize(self, self._proc.stdin.close)
        _live.add(self)
        self.environment: dict[str, Any] = self._request((target, protocol), "ready")["environment"]

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None and not self._proc.stdin.closed

    def _recv(self, kind: str) -> Any:
        while True:
            try:
                tag, payload = _recv(self._proc.stdout)
            except EOFError:
                code = self._proc.wait(10)
                raise WorkerError(
                    f"The measurement process died (exit code {code}) before reporting; the runtime crashed or ran "
                    "out of memory.",
                    "Re-run with --debug; try fewer or smaller models.",
                ) from None
            if tag == "progress":
                self._progress(*payload)
            elif tag == "log":
                name, level, message = payload
                logging.getLogger(name).log(level, message)
            else:
                break
        if tag == "error":
            self.close()
            raise payload
        assert tag == kind, f"worker protocol: expected {kind}, got {tag}"
        return payload

    def _progress(self, event: str, task_id: int, *args) -> None:
        """The worker's progress event, on the caller's reporter (whichever is current when the task opens)."""
        from squeeze import progress

        if event == "open":
            reporter = progress.current()
            self._tasks[task_id] = (reporter, reporter.open(*args))
        elif task_id in self._tasks:
            reporter, task = self._tasks[task_id]
            if event == "advance":
                task.advance(args[0], **args[1])
            elif event == "describe":
                task.describe(args[0])
            else:  # "close"
                reporter.close(task)
                del self._tasks[task_id]

    def _request(self, message: Any, kind: str) -> Any:
        """Send one message and read its reply. Interrupted in between (Ctrl-C), the reply would answer the
        next request: the worker is ended instead, so nothing can be read out of step."""
        try:
            _send(self._proc.stdin, message)
            return self._recv(kind)
        except BaseException:
            self.kill()
            raise

    def open(self, artifacts) -> tuple[list[int], list[int]]:
        """Open and calibrate artifacts; returns their ids and calls per sample."""
        opened = self._request(("open", list(artifacts)), "opened")
        return opened["ids"], opened["calls"]

    def sample(self, ids: list[int]) -> dict[int, float]:
        return self._request(("sample", ids), "samples")

    def drop(self, ids: list[int]) -> None:
        self._request(("drop", ids), "dropped")

    def kill_process(self) -> None:
        """Only the process: safe from a signal handler that interrupted a read of its pipe."""
        if self._proc.poll() is None:
            self._proc.kill()

    def _end_tasks(self) -> None:
        """The worker is gone: its steps that never said they ended are closed on the caller's reporter."""
        for reporter, task in self._tasks.values():
            reporter.close(task)
        self._tasks.clear()

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            stream.close()
        self._end_tasks()

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
        self._end_tasks()


if __name__ == "__main__":
    # Frames go to the real stdout; anything a library prints goes to stderr instead.
    frames_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # Through the package, not this __main__ module: errors pickled back must name squeeze.measure.worker.
    from squeeze.measure.worker import _serve as serve

    serve(sys.stdin.buffer, frames_out)
