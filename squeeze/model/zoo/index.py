"""The zoo's index: each model's name, input shape and description, readable without importing torch.

`squeeze list models` reads only this; the architectures (one module each in squeeze.model.zoo, torch) are
imported when a model is built, through `ZooEntry.factory`. `squeeze.model.zoo` re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from squeeze.errors import ModelLoadError
from squeeze.util.refs import import_ref
from squeeze.registry import Registry

__all__ = ["IMAGENET_SHAPE", "ZooEntry", "model_registry", "register_model", "list_models", "get_entry"]

IMAGENET_SHAPE = (1, 3, 224, 224)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    arch_ref: str  # "module:function" returning the nn.Module; also what a checkpoint records as its architecture
    input_shape: tuple[int, ...] = IMAGENET_SHAPE
    description: str = ""
    trained: bool = False  # True: create_model returns trained weights (trained on first use, then cached)

    @property
    def factory(self) -> Callable[..., Any]:
        return import_ref(self.arch_ref, ModelLoadError, "zoo model factory")


def _unknown_model(name: str, names: list[str]) -> ModelLoadError:
    return ModelLoadError(f"Unknown zoo model {name!r}.", f"Known models: {', '.join(names)} (see `squeeze list`).")


# Third-party models come from the `squeeze.models` entry-point group (an object there is a ZooEntry).
model_registry: Registry[ZooEntry] = Registry("zoo model", group="squeeze.models", error=ModelLoadError,
                                              unknown=_unknown_model)


def register_model(
    name: str,
    input_shape: tuple[int, ...] = IMAGENET_SHAPE,
    description: str = "",
    trained: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding a model factory (a top-level function) to the zoo under `name`; returns it unchanged."""

    def add(factory: Callable[..., Any]) -> Callable[..., Any]:
        entry = ZooEntry(name, f"{factory.__module__}:{factory.__name__}", tuple(input_shape), description, trained)
        model_registry.register(name, entry, owner=factory.__module__)
        return factory

    return add


def list_models() -> list[ZooEntry]:
    return list(model_registry)


def get_entry(name: str) -> ZooEntry:
    return model_registry.get(name)


# The built-in architectures, one module each in squeeze.model.zoo, after the papers' tables.
for _entry in (
    ZooEntry("resnet18", "squeeze.model.zoo.resnet:resnet18",
             description="ResNet-18: BasicBlock residual net (11.7 M params)"),
    ZooEntry("resnet50", "squeeze.model.zoo.resnet:resnet50",
             description="ResNet-50: Bottleneck residual net (25.6 M params, 4.1 G MACs)"),
    ZooEntry("mobilenet_v1", "squeeze.model.zoo.mobilenet_v1:mobilenet_v1",
             description="MobileNetV1: depthwise-separable convs (4.2 M params, 569 M MACs)"),
    ZooEntry("mobilenet_v2", "squeeze.model.zoo.mobilenet_v2:mobilenet_v2",
             description="MobileNetV2: inverted residuals, depthwise (3.5 M params)"),
    ZooEntry("densenet121", "squeeze.model.zoo.densenet:densenet121",
             description="DenseNet-121: concatenating dense blocks (8.0 M params)"),
    ZooEntry("digits-cnn", "squeeze.model.zoo.digits_cnn:digits_cnn", (1, 1, 16, 16),
             "Small residual CNN for the built-in 16x16 digits, trained on first use", trained=True),
    ZooEntry("fashion-cnn", "squeeze.model.zoo.fashion_cnn:fashion_cnn", (1, 1, 28, 28),
             "Small residual CNN for 28x28 Fashion-MNIST (91.8 % test top-1), trained on Fashion-MNIST on first use "
             "(needs the dataset-fashion-mnist package)", trained=True),
    ZooEntry("r3d-small", "squeeze.model.zoo.r3d_small:r3d_small", (1, 1, 8, 32, 32),
             "Small R3D-style 3D ResNet for fashion-motion clips (8 motion directions), trained on first use "
             "(needs the dataset-fashion-mnist package)", trained=True),
):
    model_registry.register(_entry.name, _entry, owner="squeeze.model.zoo")
