"""Datasets for calibration, fine-tuning and evaluation, resolved from one `--data` spec.

Accepted specs (see `load_data`):
  digits                   scikit-learn's 8x8 handwritten digits, resized to the model's HxW (16x16 by
                           default), in a fixed stratified 60/20/20 train/val/test split
  path/to/folder           class sub-folders of images, either split already
                           (`root/train/<class>/*.png`, `root/val/<class>/...`, optional `root/test/`)
                           or not (`root/<class>/...`, split 80/20 per class with a fixed seed)
  fashion-mnist            Fashion-MNIST (28x28 grey, 10 classes) from the Debian package dataset-fashion-mnist
                           (/usr/share/datasets/fashion-mnist/): a fixed stratified 55k/5k train/val split of
                           the 60k training images, and the official 10k test images as the test split
  idx:DIR                  any MNIST-format folder (train-/t10k- images and labels IDX files, gzipped or not),
                           split as Fashion-MNIST is (val is 1/12 of the training images)
  fashion-motion           clips (1, T, H, W) = (1, 8, 32, 32) by default, for 3D CNNs: a Fashion-MNIST item at
                           half the frame's side moving 2 px a frame in one of 8 directions; label = direction.
                           Generated deterministically from the real images (12k train clips from the train
                           split, 1k val, 2k test from the test images)
  package.module:function  a function returning (train, val[, test]) datasets, or a dict with those keys

Images become (C, H, W) float32 tensors at the model's input size and channel count (grey <-> RGB as
needed; the resize mode is part of the preprocessing), then `(x - mean) / std` per channel on [0, 1]
pixels. The preprocessing (squeeze.preprocessing.Preprocessing, `--normalize` / `--resize`) defaults to
the train split's statistics and bilinear resizing for digits, IDX data and folders, and to no normalization for
`package.module:function` data; the complete spec used is on the bundle, to be recorded. Images are read
with Pillow; IDX files with numpy (decoded once per process).
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from squeeze.errors import DataError, first_line
from squeeze.preprocessing import Preprocessing
from squeeze.util.refs import import_ref, is_ref

__all__ = [
    "DigitsSplits",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "MOTION_DIRECTIONS",
    "MotionClips",
    "read_idx",
    "digits_splits",
    "DataBundle",
    "load_data",
    "ImageFolderDataset",
    "read_image",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma: how an RGB image (and RGB statistics) become one grey channel.
_LUMA = (0.299, 0.587, 0.114)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# What digits and folders get where the user and the model decide nothing.
_IMAGE_DEFAULTS = Preprocessing(normalize="data", resize="bilinear")
# A data function's samples are used as returned: the user's code did its own preprocessing.
_MODULE_DEFAULTS = Preprocessing(normalize="none", resize="none")

_SPEC_FORMS = (
    "`digits` (the built-in digits), `fashion-mnist`, `idx:DIR` (a folder of MNIST-format IDX files), a folder "
    "of class sub-folders of images (`root/train/<class>/*.png` with `root/val/<class>/...`, or "
    "`root/<class>/...`), or `package.module:function` returning (train, val) datasets"
)
_STATS_SAMPLE = 256  # images read to estimate mean/std of a train split
_FOLDER_VAL_FRACTION = 0.2
_DEFAULT_CACHE_BYTES = 256 << 20  # decoded images kept in memory per folder dataset


# ---------------------------------------------------------------------------------------------------
# What every spec resolves to.


@dataclass(frozen=True)
class DataBundle:
    """Datasets ready for a model: each sample is ((C, H, W) float32, int label)."""

    spec: str
    train: Dataset
    val: Dataset
    test: Dataset | None
    num_classes: int
    input_shape: tuple[int, int, int, int]  # (1, C, H, W): one sample with a batch axis
    preprocessing: Preprocessing  # complete: mean/std per channel of [0, 1] pixels
    classes: tuple[str, ...] = ()

    def held_out(self) -> tuple[str, Dataset]:
        """The split reported accuracy is measured on, with its name: test, else val."""
        return ("test", self.test) if self.test is not None else ("val", self.val)

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "train_size": len(self.train),
            "val_size": len(self.val),
            "test_size": None if self.test is None else len(self.test),
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "preprocessing": self.preprocessing.to_json(),
        }


def load_data(
    spec: str,
    *,
    input_shape: Sequence[int] | None = None,
    preprocessing: Preprocessing | None = None,
    seed: int = 0,
) -> DataBundle:
    """Resolve a `--data` spec (see the module docstring) for a model taking `input_shape` (N, C, H, W).

    Without `input_shape`, digits are 1x16x16 and folder images keep the first image's size and
    channels. What `preprocessing` leaves undecided takes the source's default (see the module
    docstring). `seed` fixes the digits, IDX and single-folder splits.
    `digits` and `fashion-mnist` always mean those sources; write `./digits` for a folder of that name. A data
    function is called without arguments.
    """
    if spec == "fashion-motion":  # clips (C, T, H, W), not images
        return _load_fashion_motion(input_shape, (preprocessing or Preprocessing()).over(_IMAGE_DEFAULTS), seed)
    chw = _sample_shape(input_shape)
    asked = preprocessing or Preprocessing()
    if spec == "digits":
        return _load_digits(spec, chw, asked.over(_IMAGE_DEFAULTS), seed)
    if spec == "fashion-mnist":
        return _load_idx(spec, FASHION_MNIST_DIR, chw, asked.over(_IMAGE_DEFAULTS), seed, FASHION_MNIST_CLASSES)
    if spec.startswith("idx:"):
        return _load_idx(spec, Path(spec[4:]).expanduser(), chw, asked.over(_IMAGE_DEFAULTS), seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(spec, path, chw, asked.over(_IMAGE_DEFAULTS), seed)
    if path.exists():
        raise DataError(f"--data `{spec}` is a file; a folder data set is a directory of class sub-folders.",
                        f"Accepted forms: {_SPEC_FORMS}.")
    if is_ref(spec):
        return _load_module(spec, chw, asked)
    if "/" in spec or "\\" in spec or spec.startswith((".", "~")):
        raise DataError(f"No folder at `{spec}` (--data).", f"Check the path. Accepted forms: {_SPEC_FORMS}.")
    raise DataError(f"Unknown --data `{spec}`.", f"Accepted forms: {_SPEC_FORMS}.")


def _sample_shape(input_shape: Sequence[int] | None) -> tuple[int, int, int] | None:
    """(N, C, H, W) or (C, H, W) -> (C, H, W)."""
    if input_shape is None:
        return None
    shape = tuple(int(d) for d in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise DataError(
            f"Image data needs a model input shape (N, C, H, W); got {tuple(input_shape)}.",
            "Pass --input-shape batch first, e.g. --input-shape 1,3,224,224.",
        )
    return shape  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------
# Normalization.


def _resolve_normalization(
    pre: Preprocessing, channels: int, train_stats: Callable[[], tuple[torch.Tensor, torch.Tensor]]
) -> Preprocessing:
    """-> `pre` with per-channel mean/std of [0, 1] pixels; `train_stats` is only called for "data"."""
    if pre.mean is not None:  # given values, or resolved before (a checkpoint's record)
        try:
            return pre.model_copy(update={"mean": _per_channel(pre.mean, channels),
                                          "std": _per_channel(pre.std, channels)})
        except ValueError:
            raise DataError(
                f"--normalize gives {len(pre.mean)} means/stds, but the model takes {channels} input channels.",
                f"Give one value for all channels (MEAN,STD) or {channels} per channel (M1,...:S1,...).",
            ) from None
    if pre.normalize == "data":
        mean, std = train_stats()
        # A constant channel has std 0: leave it unscaled rather than divide by zero.
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        values = tuple(mean.tolist()), tuple(std.tolist())
    elif pre.normalize == "imagenet":
        values = _imagenet(channels)
    else:  # "none"
        values = (0.0,) * channels, (1.0,) * channels
    return pre.model_copy(update={"mean": values[0], "std": values[1]})


def _imagenet(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    # A grey image is the luma of an RGB one, so its statistics are luma-weighted too.
    grey_mean = sum(w * v for w, v in zip(_LUMA, IMAGENET_MEAN))
    grey_std = sum(w * v for w, v in zip(_LUMA, IMAGENET_STD))
    return (grey_mean,) * channels, (grey_std,) * channels


def _per_channel(values: Sequence[float], channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{len(values)} values for {channels} channels")
    return values


def _channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> per-channel mean and (unbiased) std, each (C,)."""
    per_channel = images.transpose(0, 1).reshape(images.shape[1], -1)
    return per_channel.mean(dim=1), per_channel.std(dim=1)


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., C, H, W) -> (x - mean) / std per channel."""
    mean_t = torch.tensor(mean, dtype=images.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype).view(-1, 1, 1)
    return (images - mean_t) / std_t


# ---------------------------------------------------------------------------------------------------
# Built-in digits.

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


@functools.cache
def _digits_pixels(height: int, width: int, resize: str, seed: int):
    """-> images (N, 1, H, W) in [0, 1], labels (N,), and the (train, val, test) index arrays."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # (N, 8, 8) with integer intensities 0..16 -> (N, 1, 8, 8) in [0, 1].
    pixels = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    images = _resize(pixels, (height, width), resize, "The digits")
    labels = torch.from_numpy(digits.target.astype(np.int64))

    indices = np.arange(len(labels))
    rest, test = train_test_split(indices, test_size=_TEST_FRACTION, stratify=digits.target, random_state=seed)
    train, val = train_test_split(
        rest, test_size=_VAL_FRACTION_OF_REST, stratify=digits.target[rest], random_state=seed
    )
    return images, labels, (torch.from_numpy(train), torch.from_numpy(val), torch.from_numpy(test))


@functools.cache
def digits_splits(image_size: int = 16, seed: int = 0) -> DigitsSplits:
    """The 1797 digits as `image_size` x `image_size` images in a stratified 60/20/20 split.

    Normalized with the train split's statistics, so val/test stay unseen. Cached in-process: callers
    share the same tensors and must not modify them in place.
    """
    bundle = _load_digits("digits", (1, image_size, image_size), _IMAGE_DEFAULTS, seed)
    return DigitsSplits(
        train=bundle.train,
        val=bundle.val,
        test=bundle.test,
        num_classes=bundle.num_classes,
        input_shape=bundle.input_shape,
        mean=bundle.mean[0],
        std=bundle.std[0],
    )


def _load_digits(spec: str, chw: tuple[int, int, int] | None, pre: Preprocessing, seed: int) -> DataBundle:
    channels, height, width = chw or (1, 16, 16)
    if channels not in (1, 3):
        raise DataError(
            f"The digits are grey images, fed as (1, {height}, {width}) or, repeated, as (3, {height}, "
            f"{width}); the model takes ({channels}, {height}, {width}) per sample.",
            "Use a model with 1 or 3 input channels, or a data set that fits it.",
        )
    images, labels, split_rows = _digits_pixels(height, width, pre.resize, seed)
    if channels == 3:
        images = images.repeat(1, 3, 1, 1)
    train_rows = split_rows[0]
    pre = _resolve_normalization(pre, channels, lambda: _channel_stats(images[train_rows]))
    train, val, test = (
        TensorDataset(_normalize(images[rows], pre.mean, pre.std), labels[rows]) for rows in split_rows
    )
    return DataBundle(
        spec=spec, train=train, val=val, test=test, num_classes=int(labels.max()) + 1,
        input_shape=(1, channels, height, width), preprocessing=pre, classes=tuple(str(d) for d in range(10)),
    )


def _resize(images: torch.Tensor, size_hw: tuple[int, int], mode: str, what: str) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, H, W) with a `--resize` mode; antialiased like PIL, so shrinking does not alias."""
    if tuple(images.shape[-2:]) == tuple(size_hw):
        return images
    if mode == "none":
        h, w = images.shape[-2:]
        raise DataError(
            f"{what}: the images are {h}x{w}, the model takes {size_hw[0]}x{size_hw[1]}, and --resize none keeps "
            "images at their size.",
            "Pass --resize bilinear (or bicubic, nearest) to fit them to the model, or check --input-shape.",
        )
    if mode == "nearest":
        return F.interpolate(images, size=size_hw, mode="nearest-exact")
    resized = F.interpolate(images, size=size_hw, mode=mode, align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0) if mode == "bicubic" else resized  # bicubic overshoots, as PIL clamps


# ---------------------------------------------------------------------------------------------------
# IDX files (the MNIST format): Fashion-MNIST from its Debian package, or any folder of them.

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
# (split, kind) -> the file's standard name; each may also be gzipped (name + ".gz").
_IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# 5k of Fashion-MNIST's 60k training images (500 per class): the validation split.
_IDX_VAL_FRACTION = 1 / 12
# IDX magic number, third byte: element type (big-endian); the fourth byte is the number of dimensions.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_FIX = "Replace the file with a complete copy (MNIST-format IDX, gzipped or not)."


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (gzipped or not) as an array of its declared shape and type; a bad file is a DataError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # the gzip magic number
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError; a truncated stream an EOFError
        raise DataError(f"{path} cannot be read as an IDX file ({first_line(exc)}).", _IDX_FIX) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(
            f"{path} is not an IDX file: its magic number is 0x{raw[:4].hex() or 'empty'}, where IDX files start "
            "with 0x0000, a type byte (0x08 for unsigned bytes) and the number of dimensions.",
            _IDX_FIX,
        )
    ndim, header = raw[3], 4 + 4 * raw[3]
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4)) if len(raw) >= header else ()
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize if dims else None
    if expected != len(raw):
        declared = f"declares shape {dims}, which needs {expected} bytes" if dims else "is cut inside its header"
        raise DataError(f"{path} is truncated or damaged: it {declared}, and holds {len(raw)}.", _IDX_FIX)
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="), copy=False)


def _idx_paths(folder: Path, spec: str) -> dict[tuple[str, str], Path]:
    """The four IDX files of `folder` (each plain or gzipped); a missing one is a DataError naming what to install."""
    found, missing = {}, []
    for key, name in _IDX_FILES.items():
        path = next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)
        if path is None:
            missing.append(name)
        else:
            found[key] = path
    if not missing:
        return found
    names = ", ".join(_IDX_FILES.values())
    alternative = (f"or pass `--data idx:DIR` with a folder holding the four MNIST-format files ({names}; "
                   "gzipped or not).")
    if spec == "fashion-mnist":
        raise DataError(
            f"--data fashion-mnist reads the Debian package dataset-fashion-mnist, which is not installed: "
            f"{folder} lacks {', '.join(missing)} (.gz).",
            f"Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; scripts/setup.sh does "
            f"this when run as root), {alternative}",
        )
    raise DataError(f"--data {spec}: {folder} lacks {', '.join(missing)} (plain or .gz).",
                    f"An MNIST-format folder holds the four IDX files {names}.")


@functools.cache
def _idx_arrays(paths: tuple[tuple[str, int, int], ...]) -> tuple[np.ndarray, ...]:
    """(train images, train labels, test images, test labels) from the four (path, mtime, size) files."""
    arrays = [read_idx(path) for path, _, _ in paths]
    for (images_path, _, _), images, labels in ((paths[0], arrays[0], arrays[1]), (paths[2], arrays[2], arrays[3])):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"{images_path} holds images of shape {images.shape} with labels of shape {labels.shape}; "
                "IDX image files are (N, H, W) with N labels (N,).",
                "Check that the images and labels files belong together.",
            )
    return tuple(arrays)


def _stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows), sorted: per class a seeded shuffle puts round(count * fraction) rows in val."""
    order = np.random.default_rng(seed).permutation(len(labels))
    by_class = order[np.argsort(labels[order], kind="stable")]  # grouped by class, shuffled within
    classes, starts, counts = np.unique(labels[by_class], return_index=True, return_counts=True)
    rank = np.arange(len(labels)) - np.repeat(starts, counts)  # position within its class
    in_val = rank < np.repeat(np.round(counts * fraction).astype(np.int64), counts)
    return np.sort(by_class[~in_val]), np.sort(by_class[in_val])


def _load_idx(spec: str, folder: Path, chw: tuple[int, int, int] | None, pre: Preprocessing, seed: int,
              classes: tuple[str, ...] = ()) -> DataBundle:
    paths = _idx_paths(folder, spec)
    stats = tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths.values())
    train_images, train_labels, test_images, test_labels = _idx_arrays(stats)
    channels, height, width = chw or (1, *train_images.shape[1:])
    if channels not in (1, 3):
        raise DataError(
            f"{spec} holds grey images, fed as (1, {height}, {width}) or, repeated, as (3, {height}, {width}); "
            f"the model takes ({channels}, {height}, {width}) per sample.",
            "Use a model with 1 or 3 input channels, or a data set that fits it.",
        )
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if classes and num_classes > len(classes):
        raise DataError(f"{spec} has labels up to {num_classes - 1}, but {len(classes)} classes.", _IDX_FIX)
    train_rows, val_rows = _stratified_split(train_labels, _IDX_VAL_FRACTION, seed)

    def pixels(images: np.ndarray) -> torch.Tensor:
        # (N, H, W) integers -> (N, C, H', W') float32 in [0, 1] at the model's size.
        scale = 255.0 if images.dtype == np.uint8 else max(1.0, float(images.max()))
        x = _resize(torch.from_numpy(images.astype(np.float32) / scale).unsqueeze(1), (height, width),
                    pre.resize, spec)
        return x.expand(-1, 3, -1, -1) if channels == 3 else x

    train_x = pixels(train_images)
    pre = _resolve_normalization(pre, channels, lambda: _channel_stats(train_x[torch.from_numpy(train_rows)]))
    test_x = pixels(test_images)
    train_y, test_y = (torch.from_numpy(labels.astype(np.int64)) for labels in (train_labels, test_labels))
    train, val = (TensorDataset(_normalize(train_x[rows], pre.mean, pre.std), train_y[rows])
                  for rows in (torch.from_numpy(train_rows), torch.from_numpy(val_rows)))
    test = TensorDataset(_normalize(test_x, pre.mean, pre.std), test_y)
    return DataBundle(spec=spec, train=train, val=val, test=test, num_classes=num_classes,
                      input_shape=(1, channels, height, width), preprocessing=pre,
                      classes=classes or tuple(str(c) for c in range(num_classes)))


# ---------------------------------------------------------------------------------------------------
# fashion-motion: Fashion-MNIST items moving across the frame; the label is the direction, so a 3D CNN must see
# time (a single frame says nothing of it).

MOTION_DIRECTIONS = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")
_MOTION_CLIPS = {"train": 12000, "val": 1000, "test": 2000}
_MOTION_SHAPE = (1, 8, 32, 32)  # (C, T, H, W)


class MotionClips(Dataset):
    """Clip i: item `rows[i]` of `items` ((N, s, s) [0, 1] pixels), moving in direction i % 8 from a seeded start
    that keeps its path in the frame; built on access, the same for the same index."""

    def __init__(self, items: torch.Tensor, rows: np.ndarray, cthw: tuple[int, int, int, int], seed: int,
                 mean: float = 0.0, std: float = 1.0) -> None:
        self.items, self.rows, self.cthw, self.seed, self.mean, self.std = items, rows, cthw, seed, mean, std
        self.classes = MOTION_DIRECTIONS

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        c, t, h, w = self.cthw
        item = self.items[self.rows[index]]
        side = item.shape[-1]
        label = index % len(MOTION_DIRECTIONS)
        angle = 2 * np.pi * label / len(MOTION_DIRECTIONS)
        step = max(1, min(2, (min(h, w) - side) // max(1, t - 1)))
        dx, dy = round(step * np.cos(angle)), -round(step * np.sin(angle))  # image rows grow downwards
        rng = np.random.default_rng((self.seed, index))
        # a start from which all t positions stay inside the frame
        x0 = int(rng.integers(max(0, -dx * (t - 1)), w - side - max(0, dx * (t - 1)) + 1))
        y0 = int(rng.integers(max(0, -dy * (t - 1)), h - side - max(0, dy * (t - 1)) + 1))
        clip = torch.zeros(1, t, h, w)
        for f in range(t):
            x, y = x0 + f * dx, y0 + f * dy
            clip[0, f, y:y + side, x:x + side] = item
        return (clip.expand(c, -1, -1, -1) - self.mean) / self.std, label


def _load_fashion_motion(input_shape: Sequence[int] | None, pre: Preprocessing, seed: int) -> DataBundle:
    shape = tuple(int(d) for d in input_shape[1:]) if input_shape is not None else _MOTION_SHAPE
    if len(shape) != 4 or shape[0] not in (1, 3) or shape[1] < 2 or min(shape[2:]) < 8:
        raise DataError(f"--data fashion-motion makes clips (C, T, H, W) with C 1 or 3, T >= 2 and H, W >= 8; the "
                        f"model takes {tuple(input_shape)}.", "Use a 3D CNN with input (1, 1, 8, 32, 32).")
    c, t, h, w = shape
    paths = _idx_paths(FASHION_MNIST_DIR, "fashion-mnist")
    train_images, train_labels, test_images, _ = _idx_arrays(
        tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths.values()))
    side = min(h, w) // 2

    def items(images: np.ndarray) -> torch.Tensor:  # (N, 28, 28) uint8 -> (N, side, side) [0, 1]
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return _resize(x, (side, side), pre.resize, "fashion-motion")[:, 0]

    rng = np.random.default_rng(seed)
    train_rows, val_rows = (rng.permutation(rows)[:_MOTION_CLIPS[split]] for split, rows in
                            zip(("train", "val"), _stratified_split(train_labels, _IDX_VAL_FRACTION, seed)))
    test_rows = rng.permutation(len(test_images))[:_MOTION_CLIPS["test"]]
    train_items, test_items = items(train_images), items(test_images)
    sample = MotionClips(train_items, train_rows, (1, t, h, w), seed)
    clips = torch.stack([sample[i][0] for i in range(min(_STATS_SAMPLE, len(sample)))])
    pre = _resolve_normalization(pre, 1, lambda: _channel_stats(clips))
    mean, std = pre.mean[0], pre.std[0]
    splits = [MotionClips(src, rows, shape, seed + k, mean, std) for k, (src, rows) in
              enumerate(((train_items, train_rows), (train_items, val_rows), (test_items, test_rows)))]
    return DataBundle(spec="fashion-motion", train=splits[0], val=splits[1], test=splits[2],
                      num_classes=len(MOTION_DIRECTIONS), input_shape=(1, *shape),
                      preprocessing=pre.model_copy(update={"mean": (mean,) * c, "std": (std,) * c}),
                      classes=MOTION_DIRECTIONS)


# ---------------------------------------------------------------------------------------------------
# Folders of class sub-folders.


class ImageFolderDataset(Dataset):
    """Images decoded on access, converted to (C, H, W) [0, 1] pixels, then normalized per channel.

    Decoded pixels are kept in memory up to `cache_bytes`, so later epochs skip decoding.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        chw: tuple[int, int, int],
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize: str = "bilinear",
        cache_bytes: int = _DEFAULT_CACHE_BYTES,
    ) -> None:
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.chw = tuple(chw)
        self.resize = resize
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_free = cache_bytes

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def pixels(self, index: int) -> torch.Tensor:
        """The image at `index` as (C, H, W) float32 in [0, 1], before normalization."""
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        path = self.samples[index][0]
        image = _fit_image(read_image(path), self.chw, self.resize, str(path))
        size = image.numel() * image.element_size()
        if size <= self._cache_free:
            self._cache[index] = image
            self._cache_free -= size
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.pixels(index)
        if self.mean is not None:
            image = _normalize(image, self.mean, self.std)
        return image, self.samples[index][1]


def _fit_image(image: torch.Tensor, chw: tuple[int, int, int], resize: str, what: str) -> torch.Tensor:
    """(c, h, w) with c in {1, 3} -> (C, H, W): grey <-> RGB, then the `resize` mode."""
    channels, height, width = chw
    if image.shape[0] != channels:
        if channels == 3:
            image = image.expand(3, -1, -1)
        else:
            image = (torch.tensor(_LUMA).view(3, 1, 1) * image).sum(dim=0, keepdim=True)
    return _resize(image[None], (height, width), resize, what)[0].contiguous()


def _load_folder(spec: str, root: Path, chw: tuple[int, int, int] | None, pre: Preprocessing, seed: int) -> DataBundle:
    has_train, has_val = (root / "train").is_dir(), (root / "val").is_dir()
    if has_train != has_val:
        present, missing = ("train", "val") if has_train else ("val", "train")
        raise DataError(
            f"{root} has a `{present}/` folder but no `{missing}/` folder.",
            f"Add `{root / missing}/<class>/...`, or put the class folders directly in {root} to have "
            "them split into train/val.",
        )
    if has_train:
        train_files = _scan_classes(root / "train")
        classes = sorted(train_files)
        val_files = _scan_classes(root / "val")
        test_files = _scan_classes(root / "test") if (root / "test").is_dir() else None
        for name, split in (("val", val_files), ("test", test_files)):
            unknown = sorted(set(split or ()) - set(classes))
            if unknown:
                raise DataError(
                    f"{root / name} has classes that {root / 'train'} lacks: {', '.join(unknown)}.",
                    "Every class folder of val/ and test/ needs a train/ folder of the same name.",
                )
    else:
        train_files, val_files = _split_classes(root, _scan_classes(root), seed)
        classes = sorted(train_files)
        test_files = None

    label_of = {name: label for label, name in enumerate(classes)}

    def samples(files: dict[str, list[Path]]) -> list[tuple[Path, int]]:
        return [(path, label_of[name]) for name in sorted(files) for path in files[name]]

    train_samples, val_samples = samples(train_files), samples(val_files)
    if chw is None:
        first = read_image(train_samples[0][0])
        chw = (first.shape[0], first.shape[1], first.shape[2])
    if chw[0] not in (1, 3):
        raise DataError(
            f"Folder images are fed as grey (1 channel) or RGB (3 channels); the model takes {chw[0]} "
            f"channels (sample shape {chw}).",
            "Use a model with 1 or 3 input channels, or a `package.module:function` data set that fits it.",
        )

    train = ImageFolderDataset(train_samples, classes, chw, resize=pre.resize)
    val = ImageFolderDataset(val_samples, classes, chw, resize=pre.resize)
    test = ImageFolderDataset(samples(test_files), classes, chw, resize=pre.resize) if test_files else None
    pre = _resolve_normalization(pre, chw[0], lambda: _folder_stats(train, seed))
    for dataset in (train, val, test):
        if dataset is not None:
            dataset.mean, dataset.std = pre.mean, pre.std
    return DataBundle(spec=spec, train=train, val=val, test=test, num_classes=len(classes),
                      input_shape=(1, *chw), preprocessing=pre, classes=tuple(classes))


def _scan_classes(folder: Path) -> dict[str, list[Path]]:
    """{class name: sorted image paths} for the sub-folders of `folder` (hidden entries skipped)."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{folder} has no class sub-folders.",
            "Lay the images out as <folder>/<class name>/<image>.png, one sub-folder per class.",
        )
    files = {
        d.name: sorted(
            p for p in d.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        for d in class_dirs
    }
    empty = [name for name, paths in files.items() if not paths]
    if empty:
        raise DataError(
            f"{len(empty)} class folder(s) in {folder} hold no images: {', '.join(empty)}.",
            f"Add images ({', '.join(IMAGE_SUFFIXES)}) or remove the empty folders.",
        )
    return files


def _split_classes(
    root: Path, files: dict[str, list[Path]], seed: int
) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """Per class, a seeded shuffle puts ~20 % (at least one image) in val: stratified and reproducible."""
    rng = np.random.default_rng(seed)
    train: dict[str, list[Path]] = {}
    val: dict[str, list[Path]] = {}
    for name in sorted(files):
        paths = files[name]
        if len(paths) < 2:
            raise DataError(
                f"Class `{name}` in {root} has {len(paths)} image; splitting off a validation set needs "
                "at least 2 per class.",
                f"Add images, or provide the split as {root}/train/<class>/ and {root}/val/<class>/.",
            )
        order = rng.permutation(len(paths))
        n_val = min(len(paths) - 1, max(1, round(len(paths) * _FOLDER_VAL_FRACTION)))
        val[name] = sorted(paths[i] for i in order[:n_val])
        train[name] = sorted(paths[i] for i in order[n_val:])
    return train, val


def _folder_stats(train: ImageFolderDataset, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    picks = sorted(rng.permutation(len(train))[:_STATS_SAMPLE].tolist())
    return _channel_stats(torch.stack([train.pixels(i) for i in picks]))


# ---------------------------------------------------------------------------------------------------
# `package.module:function`.


def _load_module(spec: str, chw: tuple[int, int, int] | None, asked: Preprocessing) -> DataBundle:
    function = import_ref(spec, DataError, "data function", f"Accepted forms: {_SPEC_FORMS}.")
    try:
        returned = function()
    except Exception as exc:  # the user's code: any failure is reported as theirs, the trace kept for --debug
        raise DataError(f"The data function `{spec}` raised {first_line(exc)}.",
                        "Fix the function; --debug shows the full traceback.") from exc
    splits, num_classes, classes = _unpack_returned(spec, returned)
    train, val, test = splits

    sample_shape = _check_samples(spec, splits, chw)
    if num_classes is None:
        labels = [label for ds in (train, val, test) if ds is not None for label in _labels_of(ds)]
        num_classes = max(labels) + 1
    # The samples already have the model's size (checked above): nothing is resized, whatever was asked.
    pre = asked.over(_MODULE_DEFAULTS).model_copy(update={"resize": "none"})
    pre = _resolve_normalization(pre, sample_shape[0], lambda: _dataset_stats(train))
    if pre.normalize != "none":
        train, val, test = (None if ds is None else _Normalized(ds, pre.mean, pre.std) for ds in (train, val, test))
    return DataBundle(spec=spec, train=train, val=val, test=test, num_classes=int(num_classes),
                      input_shape=(1, *sample_shape), preprocessing=pre, classes=classes)


def _unpack_returned(spec: str, returned: Any):
    """-> ((train, val, test or None), num_classes or None, class names)."""
    num_classes = None
    if isinstance(returned, dict):
        missing = [key for key in ("train", "val") if key not in returned]
        if missing:
            raise DataError(f"The dict returned by `{spec}` lacks the key(s) {', '.join(missing)}.",
                            "Return {'train': ..., 'val': ...} (optionally 'test' and 'num_classes').")
        splits = (returned["train"], returned["val"], returned.get("test"))
        num_classes = returned.get("num_classes")
    elif isinstance(returned, (tuple, list)) and len(returned) in (2, 3):
        splits = (returned[0], returned[1], returned[2] if len(returned) == 3 else None)
    else:
        raise DataError(
            f"`{spec}` returned a {type(returned).__name__}; expected (train, val), (train, val, test) or "
            "a dict with keys train and val.",
            "Return torch Datasets yielding (image tensor (C, H, W), integer label).",
        )
    for name, ds in zip(("train", "val", "test"), splits):
        if ds is None and name == "test":
            continue
        if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
            raise DataError(f"The {name} split from `{spec}` is a {type(ds).__name__}, not a dataset.",
                            "Return map-style torch Datasets (with __len__ and __getitem__).")
        if len(ds) == 0:
            raise DataError(f"The {name} split from `{spec}` is empty.")
    names = getattr(splits[0], "classes", None)
    classes = tuple(str(c) for c in names) if isinstance(names, (list, tuple)) else ()
    if num_classes is None and classes:
        num_classes = len(classes)
    return splits, num_classes, classes


def _check_samples(spec: str, splits, chw: tuple[int, int, int] | None) -> tuple[int, ...]:
    """Every split yields (tensor, label) of one shape, equal to the model's (C, H, W) when given."""
    shapes = {}
    for name, ds in zip(("train", "val", "test"), splits):
        if ds is None:
            continue
        sample = ds[0]
        if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[0], torch.Tensor)):
            raise DataError(f"The {name} split from `{spec}` yields a {type(sample).__name__}, not (tensor, label).",
                            "Each item must be (image tensor (C, H, W), integer label).")
        shapes[name] = tuple(sample[0].shape)
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise DataError(f"The splits from `{spec}` yield samples of different shapes: {listed}.")
    shape = shapes["train"]
    if chw is not None and shape != tuple(chw):
        raise DataError(
            f"`{spec}` yields samples of shape {shape}, but the model takes {tuple(chw)} per sample "
            f"(input shape {(1, *chw)}).",
            "Make the data function return images at the model's channel count and size, or check --input-shape.",
        )
    if len(shape) != 3:
        raise DataError(f"`{spec}` yields samples of shape {shape}; squeeze expects images (C, H, W).")
    return shape


def _labels_of(ds: Dataset) -> list[int]:
    """Labels without reading images when the dataset exposes them; otherwise one pass over it."""
    targets = getattr(ds, "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
        return ds.tensors[1].tolist()
    return [int(ds[i][1]) for i in range(len(ds))]


def _dataset_stats(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    picks = sorted(np.random.default_rng(0).permutation(len(ds))[:_STATS_SAMPLE].tolist())
    return _channel_stats(torch.stack([ds[i][0].float() for i in picks]))


class _Normalized(Dataset):
    """A user's dataset with (x - mean) / std applied per channel."""

    def __init__(self, base: Dataset, mean: Sequence[float], std: Sequence[float]) -> None:
        self.base, self.mean, self.std = base, tuple(mean), tuple(std)
        self.classes = getattr(base, "classes", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return _normalize(image.float(), self.mean, self.std), label


# ---------------------------------------------------------------------------------------------------
# Reading images (Pillow: PNG, JPEG and the other common formats).


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as (C, H, W) float32 in [0, 1]: C = 1 for grey images, 3 otherwise; alpha is dropped."""
    array = _read_with_pillow(Path(path))  # (H, W, C)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _read_with_pillow(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode.startswith("I"):  # 16/32-bit grey
                array = np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
            elif image.mode in ("1", "L", "LA", "La"):
                array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
            else:
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not a readable image ({first_line(exc)}).",
                        "Remove or replace the file.") from exc
    return array[:, :, None] if array.ndim == 2 else array
