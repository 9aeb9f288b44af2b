"""Built-in models: indexed once by name in `squeeze.model.zoo.index` (listed by `squeeze list` without torch),
built by `create_model`; one module per architecture (`resnet`, `mobilenet_v1`, `mobilenet_v2`, `densenet`,
`digits_cnn`, `fashion_cnn`, `r3d_small`).

Every factory is a top-level function of its architecture's module, so `squeeze.model.zoo.resnet:resnet18` is
an importable architecture reference (`ZooEntry.arch_ref`). Architectures follow the papers' tables; the
parameter counts match the usual reference implementations exactly (checked in tests/test_zoo.py). This
module imports no torch until a model is built.
"""

from __future__ import annotations

from typing import Any

from squeeze.model.zoo.index import ZooEntry, get_entry, list_models, model_registry, register_model

__all__ = ["ZooEntry", "model_registry", "register_model", "list_models", "get_entry", "create_model"]


def create_model(name: str, *, trained: bool = True, **kwargs) -> Any:
    """Build a zoo model (an `nn.Module`) in eval mode; a `trained` entry comes with its trained weights (trained
    on first use) unless `trained=False`, which gives any entry's architecture at its seeded init (enough for
    shapes, parameters and MACs)."""
    import torch

    entry = get_entry(name)
    if entry.trained and trained:
        from squeeze.model.zoo.trained import trained_model

        return trained_model(entry, kwargs)
    # Seeded init: the same model twice has the same weights, so its export and measurements are cached.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return entry.factory(**kwargs).eval()
