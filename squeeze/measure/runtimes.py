"""Runtimes that execute an exported artifact on a target. Registered by name; the target file picks one."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from squeeze.errors import RuntimeUnavailableError
from squeeze.export.artifact import OnnxArtifact
from squeeze.export.ort import open_session
from squeeze.measure.protocol import Protocol
from squeeze.registry import Registry
from squeeze.target import Target

__all__ = ["Session", "Runtime", "register_runtime", "get_runtime", "list_runtimes", "runtime_registry"]


class Session(ABC):
    """One loaded model with its input bound: `run()` is one inference."""

    @abstractmethod
    def run(self) -> None: ...

    def sample(self, calls: int) -> float:
        """Mean milliseconds per call over `calls` back-to-back calls. Runtimes that time on the device
        (TVM's time_evaluator; over RPC a host-side loop would time the network) override this."""
        t0 = time.perf_counter()
        for _ in range(calls):
            self.run()
        return (time.perf_counter() - t0) * 1e3 / calls


class Runtime(ABC):
    name: str

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def providers(self, target: Target) -> list[str]:
        """What actually executes the model (checked, not just requested)."""

    def configure_process(self, protocol: Protocol) -> None:
        """Process-wide set-up, called once in a fresh measurement worker before any `open`."""

    def labels(self, target: Target) -> dict:
        """Facts every measurement on `target` must carry in its environment (e.g. untuned, emulated)."""
        return {}

    def devices(self, target: Target) -> int:
        """How many devices can each time a run at once (boards behind one tracker key); a host is one: two
        runs on it at once would time each other."""
        return 1

    @abstractmethod
    def open(self, artifact: OnnxArtifact, target: Target, protocol: Protocol) -> Session: ...


# Third-party runtimes come from the `squeeze.runtimes` entry-point group; target files are validated against it.
# The tvm runtime registers from its own module (which imports TVM only when a TVM target is used).
runtime_registry: Registry[Callable[[], Runtime]] = Registry("runtime", group="squeeze.runtimes",
                                                              error=RuntimeUnavailableError,
                                                              modules=("squeeze.measure.tvm",))


def register_runtime(name: str):
    def deco(cls):
        cls.name = name
        return runtime_registry.register(name, cls)

    return deco


def list_runtimes() -> list[str]:
    return runtime_registry.names()


def get_runtime(target: Target) -> Runtime:
    if target.runtime not in runtime_registry:
        raise RuntimeUnavailableError(
            f"Target `{target.name}` uses the `{target.runtime}` runtime, which this squeeze installation does not provide.",
            f"Available runtimes: {', '.join(list_runtimes())}. Use --target host-cpu, or install the runtime's extra "
            f"(pip install 'squeeze[{target.runtime}]').",
        )
    return runtime_registry.get(target.runtime)()


def seeded_input(artifact: OnnxArtifact, protocol: Protocol) -> np.ndarray:
    rng = np.random.default_rng(protocol.seed)
    shape = (protocol.batch_size, *artifact.input_shape[1:])
    return rng.standard_normal(shape, dtype=np.float32)


class _OrtSession(Session):
    def __init__(self, sess, feed: dict[str, np.ndarray]) -> None:
        self._sess, self._feed = sess, feed

    def run(self) -> None:
        self._sess.run(None, self._feed)


@register_runtime("onnxruntime")
class OrtRuntime(Runtime):
    def version(self) -> str:
        import onnxruntime as ort

        return ort.__version__

    def providers(self, target: Target) -> list[str]:
        import onnxruntime as ort

        available = ort.get_available_providers()
        missing = [p for p in target.providers if p not in available]
        if missing:
            raise RuntimeUnavailableError(
                f"Target `{target.name}` needs ONNX Runtime's {', '.join(missing)}, but the installed onnxruntime "
                f"{ort.__version__} offers only {', '.join(available)}.",
                "For CUDA, install onnxruntime-gpu on a machine with an NVIDIA GPU and driver "
                "(pip uninstall onnxruntime && pip install onnxruntime-gpu); or measure on --target host-cpu.",
            )
        return list(target.providers)

    def configure_process(self, protocol: Protocol) -> None:
        import onnxruntime as ort

        # One thread pool for all sessions: with a pool per session, the spinning workers of the model
        # timed last steal cores from the next one (ResNet-18 read 24 ms instead of 12 ms interleaved).
        ort.set_global_thread_pool_sizes(protocol.threads, 1)
        ort.set_default_logger_severity(4)  # errors reach the parent as exceptions, not as log lines on stderr

    def open(self, artifact: OnnxArtifact, target: Target, protocol: Protocol) -> Session:
        import onnxruntime as ort

        providers = self.providers(target)
        sess = open_session(artifact, providers, use_per_session_threads=False,
                            execution_mode=ort.ExecutionMode.ORT_SEQUENTIAL,
                            graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        # ORT silently falls back to CPU when a GPU provider cannot start: refuse to time the wrong device.
        if providers[0] not in sess.get_providers():
            raise RuntimeUnavailableError(
                f"ONNX Runtime could not start {providers[0]} for target `{target.name}` "
                f"(the session runs on {', '.join(sess.get_providers())}).",
                "Check that a GPU and its driver are visible (nvidia-smi), or use --target host-cpu.",
            )
        return _OrtSession(sess, {artifact.input_name: seeded_input(artifact, protocol)})
