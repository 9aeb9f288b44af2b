"""Trained zoo entries: trained once on their data set (`_TRAIN_DATA`), then loaded from the cache.

Imported only when a trained entry is built with its weights: training (and the data sets) stay out of
everything else that builds or lists zoo models.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from squeeze.errors import first_line
from squeeze.model.zoo.index import ZooEntry
from squeeze.train import train_classifier
from squeeze.util.cache import atomic_write_bytes, cache_dir

__all__ = ["trained_model"]


@dataclass(frozen=True)
class _TrainRecipe:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float
    seed: int


_RECIPES = {
    # ~99.5 % test top-1 (>= 97 % across seeds).
    "digits-cnn": _TrainRecipe(epochs=10, lr=3e-3, batch_size=64, weight_decay=1e-4, seed=0),
    # 91.8 % test top-1 (92.2 % val) after 3 epochs.
    "fashion-cnn": _TrainRecipe(epochs=3, lr=3e-3, batch_size=128, weight_decay=1e-4, seed=0),
    # 100 % val/test top-1 after 1 epoch of the 12k fashion-motion clips.
    "r3d-small": _TrainRecipe(epochs=1, lr=3e-3, batch_size=64, weight_decay=1e-4, seed=0),
}
# How long the first use trains, as measured (told to the user before it starts). fashion-cnn: 1 min 54 s from
# an empty cache on 2 idle AVX2 cores, 13 min on 2 cores shared with other jobs (load 4-5).
_TAKES = {"digits-cnn": "about 3 s on 2 CPU cores", "fashion-cnn": "about 2 min on 2 idle CPU cores",
          "r3d-small": "about 4.5 min on 2 CPU cores under load 4"}
# The `--data` spec each trained entry learns from (its train split, at the entry's input shape).
_TRAIN_DATA = {"digits-cnn": "digits", "fashion-cnn": "fashion-mnist", "r3d-small": "fashion-motion"}


def trained_model(entry: ZooEntry, kwargs: dict) -> nn.Module:
    recipe = _RECIPES[entry.name]
    # Seeded init without touching the caller's RNG: the same kwargs give the same trained weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = entry.factory(**kwargs)
    path = cache_dir("zoo") / f"{entry.name}-{_weights_key(entry, model, recipe)}.pt"
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        # A damaged file fails in many ways (unpickling, zip, shape mismatch); any of them means the
        # cache cannot be trusted, so train again and overwrite it.
        except Exception as exc:
            logging.getLogger("squeeze.zoo").warning(f"cached weights {path} are unreadable ({first_line(exc)}); "
                                                     "training again")

    from squeeze.data import load_data  # the data set's own needs (scikit-learn, a package) only on first use

    data = _TRAIN_DATA[entry.name]
    logging.getLogger("squeeze.zoo").info(f"zoo:{entry.name} is trained on {data} on first use "
                                          f"({_TAKES[entry.name]}); its weights are cached in {path}")
    train_classifier(model, load_data(data, input_shape=entry.input_shape).train,
                     progress=f"training zoo:{entry.name} ({recipe.epochs} epochs)", **asdict(recipe))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return model.eval()


def _weights_key(entry: ZooEntry, model: nn.Module, recipe: _TrainRecipe) -> str:
    """Short hash of what determines the weights: architecture, recipe, data, torch major.minor."""
    torch_version = ".".join(torch.__version__.split(".")[:2])
    identity = {
        "model": repr(model),
        "recipe": asdict(recipe),
        "input_shape": list(entry.input_shape),
        "torch": torch_version,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
