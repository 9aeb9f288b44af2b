"""A deterministic runtime for tests: an artifact's "latency" is a fixed function of its weights' bytes.

It is a real squeeze runtime plugin (found through the `squeeze.runtimes` entry point of the dist-info next to
it), so the measurement worker loads it as it would a third-party runtime. Fewer or narrower weights read
faster, as on hardware; the same artifact always reads the same, so a search under it is reproducible.
"""

import onnx

from squeeze.measure.runtimes import Runtime, Session

MS_PER_MB = 1.0
BASE_MS = 0.05


class _FakeSession(Session):
    def __init__(self, ms: float) -> None:
        self.ms = ms

    def run(self) -> None:
        pass

    def sample(self, calls: int) -> float:
        return self.ms


class FakeRuntime(Runtime):
    name = "fake"

    def version(self) -> str:
        return "1.0"

    def providers(self, target) -> list[str]:
        return ["fake"]

    def open(self, artifact, target, protocol) -> Session:
        graph = onnx.load(str(artifact.path)).graph
        size = sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer)
        return _FakeSession(BASE_MS + MS_PER_MB * size / 1e6)
