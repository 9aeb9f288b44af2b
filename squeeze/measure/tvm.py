"""The `tvm` runtime: a TVM-compiled library run here (local), on a board over TVM RPC (rpc), or only
compiled (compile-only, e.g. a CUDA target on a machine without a GPU: nothing is timed).

Timing uses the Relax VM's `time_evaluator` on the device itself: over RPC a host-side loop would time the
network. Every opened model is first run once and compared with ONNX Runtime on the host (same input).
Boards: `connect` gives each failure its own message (nothing listening, no free device with the key,
a handshake that never completes, a session that ends mid-run), and retries the ones a reboot explains.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from squeeze.util.cache import atomic_write_bytes, cache_dir
from squeeze.errors import ExportError, RuntimeUnavailableError, first_line
from squeeze.export.artifact import OnnxArtifact, compare_outputs
from squeeze.export.ort import open_session
from squeeze.export.tvm import build_library, compile_only, device_kind, import_tvm, resolve_target
from squeeze.measure.protocol import Protocol
from squeeze.measure.runtimes import Runtime, Session, register_runtime, seeded_input
from squeeze.target import RpcOptions, Target, parse_host_port

__all__ = ["BoardError", "BoardTimeout", "NothingListening", "DeviceDropped", "CompileOnlyError", "HOW_TO_START",
           "TvmRuntime", "Fleet", "fleet", "connect", "ort_reference", "first_output", "labels_for", "runner_mode"]

# TVM's tracker client retries for 60 s, logging a warning every 5 s, in a thread `_within` has given up on after
# its own deadline and message: those late lines only repeat (or contradict) what squeeze already said.
logging.getLogger("RPCServer").setLevel(logging.ERROR)

HOW_TO_START = (
    "On the board (with `pip install apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1`) start "
    "`python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090` and pass `--rpc BOARD_IP:9090` (or set "
    "SQUEEZE_RPC_HOST and SQUEEZE_RPC_PORT, or `tvm.rpc.host`/`port` in the target file). With a tracker: "
    "`python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190` on any machine, "
    "`python -m tvm.exec.rpc_server --tracker TRACKER_IP:9190 --key rpi4` on each board, and "
    "`--tracker TRACKER_IP:9190 --key rpi4` here (or SQUEEZE_RPC_TRACKER / SQUEEZE_RPC_KEY)."
)


class BoardError(RuntimeUnavailableError):
    """The board cannot be reached or used."""

    retryable = False  # whether another attempt may succeed (a rebooting board, a busy server)


class BoardTimeout(BoardError):
    retryable = True


class NothingListening(BoardError):
    retryable = True


class DeviceDropped(BoardError):
    pass


class CompileOnlyError(RuntimeUnavailableError):
    pass


def runner_mode(target: Target) -> str:
    """"local", "rpc" or "compile-only" (chosen, or forced by a missing local GPU)."""
    return "compile-only" if compile_only(target) else target.tvm.runner


def labels_for(target: Target) -> dict[str, Any]:
    """What every measurement on a TVM target says about itself. Untuned CPU code is not scheduled at all
    (~100x slower than ONNX Runtime): such a figure is never the target's latency, so it is marked."""
    tuned = target.tvm.tuning == "metaschedule" and not target.emulated
    tvm_target = resolve_target(target)
    return {
        "tvm_target": str(tvm_target),
        "runner": runner_mode(target),
        "board": target.tvm.rpc.address if target.tvm.runner == "rpc" and target.tvm.rpc else None,
        "tuning": f"metaschedule, {target.tvm.tuning_trials} trials per layer" if tuned else "none",
        "untuned": not tuned and tvm_target.kind.name == "llvm",
        "emulated": target.emulated,
    }


# --- boards ---------------------------------------------------------------------------------------------


def _no_board(target: Target) -> BoardError:
    return BoardError(f"Target `{target.name}` runs on a board over TVM RPC, but no board is configured.", HOW_TO_START)


def _probe(host: str, port: int, timeout_s: float, what: str) -> None:
    """A plain TCP connect: tells 'nothing listening' from 'no answer' before TVM's blocking handshake."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except ConnectionRefusedError:
        raise NothingListening(f"Nothing listening at {host}:{port} ({what}; connection refused).",
                               HOW_TO_START) from None
    except (socket.timeout, TimeoutError):
        raise BoardTimeout(f"No answer from {host}:{port} ({what}) within {timeout_s:g} s: the machine is down, "
                           "unreachable or firewalled.", "Check the address and the network, or raise "
                           "`tvm.rpc.connect_timeout_s`.") from None
    except OSError as exc:
        raise BoardError(f"Cannot reach {host}:{port} ({what}): {exc.strerror or exc}.",
                         "Check the host name or address.") from None


def _within(timeout_s: float, fn: Callable[[], Any], on_timeout: BoardError) -> Any:
    """Run a blocking TVM call with a deadline (TVM's handshakes and tracker requests have none)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise on_timeout
    if "error" in box:
        raise box["error"]
    return box["value"]


def _connect_direct(rpc: RpcOptions):
    from tvm import rpc as tvm_rpc

    _probe(rpc.host, rpc.port, rpc.connect_timeout_s, "rpc_server")
    timeout = BoardTimeout(
        f"{rpc.host}:{rpc.port} accepted the connection but did not complete the TVM RPC handshake within "
        f"{rpc.connect_timeout_s:g} s: it is busy with another session, or it is not a TVM rpc_server.",
        "Wait for the other session to end (an rpc_server serves one at a time), check the port, or raise "
        "`tvm.rpc.connect_timeout_s`.")
    try:
        return _within(rpc.connect_timeout_s,
                       lambda: tvm_rpc.connect(rpc.host, rpc.port, session_timeout=rpc.session_timeout_s), timeout)
    except BoardError:
        raise
    except Exception as exc:  # TVM's RPC raises its own error types
        raise BoardError(f"The TVM RPC handshake with {rpc.host}:{rpc.port} failed ({first_line(exc)}).",
                         "Check that an rpc_server of the same TVM version runs there (a server registered with a "
                         "tracker only accepts sessions the tracker hands out: use --tracker and --key).") from None


@dataclass(frozen=True)
class Fleet:
    """The boards a tracker knows under one key: each registered server's address, and the queue's state."""

    key: str
    boards: list[str]  # HOST:PORT each rpc_server registered from
    free: int  # boards idle now (the tracker does not say which)
    waiting: int  # session requests queued for a board

    def describe(self) -> str:
        listed = ", ".join(self.boards) or "none"
        return (f"{len(self.boards)} board(s) under key `{self.key}` ({listed}): {self.free} free, "
                f"{len(self.boards) - self.free} busy, {self.waiting} request(s) waiting")


def _tracker(rpc: RpcOptions):
    """The tracker's client and its summary, with the tracker errors of `connect`."""
    from tvm import rpc as tvm_rpc

    host, port = parse_host_port(rpc.tracker, "tracker")
    _probe(host, port, rpc.connect_timeout_s, "rpc_tracker")
    try:
        tracker = _within(rpc.connect_timeout_s, lambda: tvm_rpc.connect_tracker(host, port), BoardTimeout(
            f"{host}:{port} accepted the connection but did not answer as a TVM rpc_tracker within "
            f"{rpc.connect_timeout_s:g} s.", "Check the port: is it the tracker's (default 9190)?"))
        summary = _within(rpc.connect_timeout_s, tracker.summary, BoardTimeout(
            f"The tracker at {host}:{port} did not send its device list within {rpc.connect_timeout_s:g} s.",
            "Check the tracker."))
    except BoardError:
        raise
    except Exception as exc:  # TVM's tracker client raises RuntimeError/OSError on a wrong peer
        raise BoardError(f"{host}:{port} is not a TVM rpc_tracker ({first_line(exc)}).",
                         "Check the port: is it the tracker's (default 9190)?") from None
    return tracker, summary


def fleet(rpc: RpcOptions) -> Fleet:
    """The boards behind `rpc.key` on `rpc.tracker`."""
    import_tvm()
    _, summary = _tracker(rpc)
    servers = [s for s in summary.get("server_info", []) if s.get("key", "").split(":", 1)[-1] == rpc.key]
    queue = summary.get("queue_info", {}).get(rpc.key, {})
    return Fleet(rpc.key, sorted(":".join(map(str, s.get("addr", ["?"]))) for s in servers), queue.get("free", 0),
                 queue.get("pending", 0))


def _connect_tracker(rpc: RpcOptions):
    host, port = parse_host_port(rpc.tracker, "tracker")
    where = f"tracker at {host}:{port}"
    tracker, summary = _tracker(rpc)
    queues = summary.get("queue_info", {})
    registered = sum(1 for s in summary.get("server_info", []) if s.get("key", "").split(":", 1)[-1] == rpc.key)
    if not registered:
        known = ", ".join(f"{k} ({v.get('free', 0)} free)" for k, v in sorted(queues.items())) or "none"
        raise BoardError(f"The {where} has no free device with key `{rpc.key}` (keys it knows: {known}).",
                         f"Start the board's server with `python -m tvm.exec.rpc_server --tracker {host}:{port} "
                         f"--key {rpc.key}`, or pass the key the board registered with (--key). {HOW_TO_START}")
    busy = BoardTimeout(f"The {where} has no free device with key `{rpc.key}`: {registered} registered, all busy for "
                        f"{rpc.connect_timeout_s:g} s.", "Wait for the running sessions to end, add boards, or raise "
                        "`tvm.rpc.connect_timeout_s`.")
    try:
        return _within(rpc.connect_timeout_s,
                       lambda: tracker.request(rpc.key, session_timeout=rpc.session_timeout_s, max_retry=1), busy)
    except BoardError:
        raise
    except Exception as exc:  # the tracker hands out an address the host cannot reach, or the board refuses
        raise BoardError(f"The {where} gave a device with key `{rpc.key}`, but connecting to it failed "
                         f"({first_line(exc)}).", "Check that the board's address is reachable from this machine "
                         "(rpc_server --custom-addr sets what it reports).") from None


def connect(target: Target, rpc: RpcOptions | None = None):
    """An RPC session on the target's board, retried `rpc.retries` times (a board may be rebooting) except
    where retrying cannot help (an unknown tracker key, a wrong peer)."""
    import_tvm()
    rpc = rpc or target.tvm.rpc
    if rpc is None or rpc.address is None:
        raise _no_board(target)
    for attempt in range(rpc.retries + 1):
        try:
            return _connect_tracker(rpc) if rpc.tracker else _connect_direct(rpc)
        except BoardError as exc:
            if not exc.retryable or attempt == rpc.retries:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


# --- numerics ---------------------------------------------------------------------------------------------


def ort_reference(artifact: OnnxArtifact, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's output on the host for the same input: what TVM's output must match."""
    sess = open_session(artifact)
    return sess.run(None, {artifact.input_name: x})[0]


def first_output(value) -> np.ndarray:
    while not hasattr(value, "numpy"):  # a tuple of outputs: the model's first
        value = value[0]
    return value.numpy()


def _runnable(target: Target) -> str:
    """The runner mode, unless it is compile-only: then nothing can be timed, which is an error here."""
    import_tvm()
    mode = runner_mode(target)
    if mode == "compile-only":
        why = "its runner is compile-only" if target.tvm.runner == "compile-only" else "TVM finds no CUDA GPU here"
        raise CompileOnlyError(
            f"Target `{target.name}` can only be compiled on this machine ({why}): code generation is checked, "
            "no latency is measured.",
            f"`squeeze targets check {target.name}` shows what was checked; measure on a machine with the device.")
    return mode


# --- runtime ----------------------------------------------------------------------------------------------


class _TvmSession(Session):
    def __init__(self, runtime: "TvmRuntime", vm, dev, artifact: OnnxArtifact, remote: bool) -> None:
        self._runtime, self._vm, self._dev, self.artifact, self._remote = runtime, vm, dev, artifact, remote
        self._timers: dict[int, Any] = {}
        self.samples: list[tuple[int, float]] = []  # (calls, ms per call), kept if the board drops

    def _failed(self, exc: Exception) -> Exception:
        """On a board, any failure of a call means the session is gone; here it is the runtime's own error."""
        return self._runtime.dropped(exc) if self._remote else exc

    def run(self) -> None:
        try:
            self._vm.invoke_stateful("main")
        except Exception as exc:  # TVM's runtime and RPC errors
            raise self._failed(exc) from None

    def sample(self, calls: int) -> float:
        try:
            if calls not in self._timers:
                self._timers[calls] = self._vm.time_evaluator("invoke_stateful", self._dev, number=calls, repeat=1)
            ms = self._timers[calls]("main").mean * 1e3
        except Exception as exc:  # TVM's runtime and RPC errors
            raise self._failed(exc) from None
        self.samples.append((calls, ms))
        return ms


@register_runtime("tvm")
class TvmRuntime(Runtime):
    def __init__(self) -> None:
        self._target: Target | None = None
        self._remote = None
        # Weak: the worker drops sessions (a search opens many); their partial samples matter while they live.
        self._sessions: weakref.WeakSet[_TvmSession] = weakref.WeakSet()

    def version(self) -> str:
        return import_tvm().__version__

    def providers(self, target: Target) -> list[str]:
        """What runs the model; fails here (before any export) when nothing can: no GPU, no board."""
        mode = _runnable(target)
        tvm_target = resolve_target(target)
        name = f"{tvm_target.kind.name} {tvm_target.attrs.get('mcpu') or tvm_target.attrs.get('arch') or ''}".strip()
        if mode == "rpc":
            rpc = target.tvm.rpc
            if rpc is None or rpc.address is None:
                raise _no_board(target)
            if rpc.tracker:
                _probe(*parse_host_port(rpc.tracker, "tracker"), rpc.connect_timeout_s, "rpc_tracker")
            else:
                _probe(rpc.host, rpc.port, rpc.connect_timeout_s, "rpc_server")
            return [f"{name} via RPC ({rpc.address})"]
        return [f"{name} (local)"]

    def configure_process(self, protocol: Protocol) -> None:
        # TVM's thread pool reads this when it starts (first run); a board's pool is set after connecting.
        os.environ["TVM_NUM_THREADS"] = str(protocol.threads)

    def labels(self, target: Target) -> dict:
        return labels_for(target)

    def devices(self, target: Target) -> int:
        rpc = target.tvm.rpc if target.tvm else None
        if runner_mode(target) != "rpc" or rpc is None or not rpc.tracker:
            return 1
        # Boards behind one key share the machine only when emulated on it, and those never time latency.
        return max(1, len(fleet(rpc).boards))

    def _device(self, target: Target, protocol: Protocol):
        tvm = import_tvm()
        kind = device_kind(target)
        if runner_mode(target) != "rpc":
            return None, tvm.device(kind, 0)
        if self._remote is None:
            self._target = target
            self._remote = connect(target)
            self._remote.get_function("runtime.config_threadpool")(1, protocol.threads)
        return self._remote, self._remote.device(kind, 0)

    def open(self, artifact: OnnxArtifact, target: Target, protocol: Protocol) -> Session:
        tvm = import_tvm()
        from tvm import relax

        _runnable(target)
        lib = build_library(artifact, target, protocol.batch_size)
        remote, dev = self._device(target, protocol)
        x = seeded_input(artifact, protocol)
        try:
            if remote is None:
                module = tvm.runtime.load_module(str(lib.path))
            else:
                remote.upload(str(lib.path), target=lib.path.name)
                module = remote.load_module(lib.path.name)
            vm = relax.VirtualMachine(module, dev)
            data = tvm.runtime.tensor(x, dev)
            got = first_output(vm["main"](data))
        except Exception as exc:  # TVM's runtime and RPC raise their own error types
            if remote is not None:
                raise self.dropped(exc) from None
            raise ExportError(f"The TVM library of {artifact.path.name} failed to run on `{target.name}` "
                              f"({first_line(exc)}).", "Re-run with --debug for details.") from None
        parity = compare_outputs(got, ort_reference(artifact, x))
        if not parity.passed:
            raise ExportError(
                f"TVM's output for {artifact.path.name} on `{target.name}` differs from ONNX Runtime on the host: "
                f"max abs error {parity.max_abs_err:.3g} (tolerance atol={parity.atol}, rtol={parity.rtol}).",
                "Check the target's `tvm.target` (e.g. fast-math attributes); report the model if it persists.")
        vm.set_input("main", data)
        session = _TvmSession(self, vm, dev, artifact, remote is not None)
        self._sessions.add(session)
        return session

    def dropped(self, exc: BaseException) -> BoardError:
        """The board went away mid-run: keep what was measured in a file, and say where."""
        target = self._target
        rpc = target.tvm.rpc if target else None
        path = cache_dir("partial") / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}.json"
        record = {"target": target.name if target else None, "board": rpc.address if rpc else None,
                  "error": first_line(exc, 400), "time": time.time(),
                  "models": [{"artifact_sha256": s.artifact.sha256, "input_shape": list(s.artifact.input_shape),
                              "samples": [{"calls": c, "ms": ms} for c, ms in s.samples]} for s in self._sessions]}
        atomic_write_bytes(path, json.dumps(record, indent=1).encode())
        kept = sum(len(s.samples) for s in self._sessions)
        where = rpc.address if rpc else "the board"
        if "RPCSessionTimeoutError" in str(exc):
            return BoardTimeout(f"The RPC session on {where} timed out after {rpc.session_timeout_s:g} s (the server "
                                f"ends sessions then); partial results kept ({kept} samples) in {path}.",
                                "Raise `tvm.rpc.session_timeout_s` in the target file, or measure fewer models.")
        return DeviceDropped(f"The device at {where} dropped mid-run ({first_line(exc)}); partial results kept "
                             f"({kept} samples) in {path}.",
                             "Check the board (power, network, the rpc_server's log) and re-run; measurements that "
                             "finished are cached.")
