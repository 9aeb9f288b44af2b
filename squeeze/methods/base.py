"""The Pass interface every compression method plugs into, and the registry of passes by name.

Pass modules import heavy libraries (torch, onnxruntime) inside `run`, so that listing passes and
validating recipes stays light.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from squeeze.errors import RecipeError
from squeeze.registry import Registry

if TYPE_CHECKING:
    from squeeze.export.onnx import OnnxArtifact
    from squeeze.measure.bench import Measurement
    from squeeze.measure.oracle import LatencyOracle
    from squeeze.measure.protocol import Protocol
    from squeeze.model.loading import LoadedModel
    from squeeze.recipe import Budget, ExportOptions
    from squeeze.target import Target

__all__ = ["PassOptions", "Pass", "ModelState", "PassContext", "register_pass", "get_pass", "list_passes",
           "pass_registry"]


class PassOptions(BaseModel):
    """Base of every pass's typed options; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class ModelState:
    """What flows between passes: the current model, its export, and what has been measured of it."""

    model: LoadedModel
    artifact: OnnxArtifact | None = None
    measurements: dict[str, Measurement] = field(default_factory=dict)


@dataclass
class PassContext:
    target: Target
    oracle: LatencyOracle
    protocol: Protocol
    export: ExportOptions
    budget: Budget | None = None
    data: Any = None  # a squeeze.data.DataBundle, for passes that fine-tune or evaluate
    seed: int = 0
    use_cache: bool = True
    checkpoint: Any = None  # a squeeze.prune.resume.StageCheckpoint, given to a resumable pass only


class Pass(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[PassOptions]] = PassOptions
    needs_budget: ClassVar[bool] = False  # recipes using this pass must give `budget:`
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda", "arm")  # target devices it serves; others are refused
    runtimes: ClassVar[tuple[str, ...] | None] = None  # the runtimes its exports are written for (None: any)
    # A run on a small net in seconds: the contract tests (tests/test_contract.py) run every method with these.
    smoke_options: ClassVar[dict[str, Any]] = {}
    smoke_budget: ClassVar[dict[str, Any]] = {"macs_ratio": 0.7}
    # Saves its progress in ctx.checkpoint as it goes, so that `--resume` continues a stopped run.
    resumable: ClassVar[bool] = False

    def __init__(self, options: PassOptions) -> None:
        self.options = options

    @abstractmethod
    def run(self, state: ModelState, ctx: PassContext) -> tuple[ModelState, dict[str, Any]]:
        """Return the new state and a JSON-serializable plan/record of what this pass did."""


# Third-party methods come from the `squeeze.methods` entry-point group (see the README, "Plugins").
# Every module under squeeze/methods/ is imported on the first lookup: each registers the method it holds.
pass_registry: Registry[type[Pass]] = Registry("method", group="squeeze.methods", error=RecipeError,
                                               packages=("squeeze.methods",))


def register_pass(cls: type[Pass]) -> type[Pass]:
    return pass_registry.register(cls.name, cls)


def list_passes() -> list[type[Pass]]:
    return list(pass_registry)


def get_pass(name: str) -> type[Pass]:
    return pass_registry.get(name)
