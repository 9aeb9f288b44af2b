"""Built-in data: scikit-learn's 8x8 handwritten digits, upscaled, normalized and split once."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

__all__ = ["DigitsSplits", "digits_splits"]

_TEST_FRACTION = 0.2
# Of the remaining 80 %, a quarter is 20 % of the whole: train/val/test = 60/20/20.
_VAL_FRACTION_OF_REST = 0.25


@dataclass(frozen=True)
class DigitsSplits:
    """Fixed train/val/test splits; x is (N, 1, S, S) float32 normalized, y is (N,) int64."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int, int]
    mean: float
    std: float


@functools.lru_cache(maxsize=None)
def digits_splits(image_size: int = 16, seed: int = 0) -> DigitsSplits:
    """The 1797 digits as `image_size` x `image_size` images in a stratified 60/20/20 split.

    Cached in-process: callers share the same tensors and must not modify them in place.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # (N, 8, 8) with integer intensities 0..16 -> (N, 1, 8, 8) in [0, 1].
    pixels = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False)
    labels = torch.from_numpy(digits.target.astype(np.int64))

    indices = np.arange(len(labels))
    rest, test = train_test_split(
        indices, test_size=_TEST_FRACTION, stratify=digits.target, random_state=seed
    )
    train, val = train_test_split(
        rest, test_size=_VAL_FRACTION_OF_REST, stratify=digits.target[rest], random_state=seed
    )

    # Statistics of the train split only, so val/test stay unseen.
    train_images = images[torch.from_numpy(train)]
    mean = float(train_images.mean())
    std = float(train_images.std())

    def subset(idx: np.ndarray) -> TensorDataset:
        rows = torch.from_numpy(idx)
        return TensorDataset((images[rows] - mean) / std, labels[rows])

    return DigitsSplits(
        train=subset(train),
        val=subset(val),
        test=subset(test),
        num_classes=int(labels.max()) + 1,
        input_shape=(1, 1, image_size, image_size),
        mean=mean,
        std=std,
    )
