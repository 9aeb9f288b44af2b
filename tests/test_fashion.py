"""IDX files (the MNIST format), `--data idx:DIR`, `--data fashion-mnist` and the fashion-cnn zoo entry."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from squeeze import data as data_module
from squeeze.data import FASHION_MNIST_DIR, load_data, read_idx
from squeeze.errors import DataError

INSTALL = "sudo apt-get install dataset-fashion-mnist"
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed under {FASHION_MNIST_DIR}: {INSTALL} (Debian/Ubuntu)",
)


def idx_bytes(array: np.ndarray) -> bytes:
    """An array as an IDX file: 0x0000, type byte, ndim, big-endian uint32 dims, big-endian data."""
    codes = {np.dtype("u1"): 0x08, np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def mnist_folder(root: Path, n_train=144, n_test=30, size=8, classes=4, gz=True) -> Path:
    """A small MNIST-format folder; pixel (0, 0) of each image is its label * 10, to trace rows."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % classes).astype(np.uint8)
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        images[:, 0, 0] = labels * 10
        suffix = ".gz" if gz else ""
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
    return root


# ---------------------------------------------------------------------------------------------------
# IDX parsing.


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", ["u1", "i4", "f4"])
def test_read_idx_round_trips(tmp_path, gz, dtype):
    array = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype) if dtype != "u1" else \
        np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    got = read_idx(write_idx(tmp_path / "a.idx", array, gz))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("gz", [True, False])
def test_truncated_idx_is_a_clear_error(tmp_path, gz):
    raw = idx_bytes(np.zeros((10, 4, 4), np.uint8))[:-5]
    path = tmp_path / "cut.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    with pytest.raises(DataError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value) and "(10, 4, 4)" in str(err.value)


def test_truncated_gzip_stream_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((10, 4, 4), np.uint8)))[:-12])
    with pytest.raises(DataError, match="cannot be read as an IDX file") as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_bad_magic_number_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x89PNG" + bytes(64))
    with pytest.raises(DataError, match="magic number is 0x89504e47") as err:
        read_idx(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------------------------
# `--data idx:DIR` end to end.


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_splits_shapes_labels(tmp_path, gz):
    root = mnist_folder(tmp_path / "m", gz=gz)
    bundle = load_data(f"idx:{root}")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (132, 12, 30)
    assert bundle.input_shape == (1, 1, 8, 8) and bundle.num_classes == 4
    assert bundle.classes == ("0", "1", "2", "3")
    assert bundle.held_out()[0] == "test"
    # Stratified: the 1/12 val split takes 3 of each class's 36 training images.
    assert np.bincount(bundle.val.tensors[1].numpy()).tolist() == [3, 3, 3, 3]
    # Each image still carries its label (pixel (0, 0) = label * 10, before normalization).
    mean, std = bundle.mean[0], bundle.std[0]
    for split in (bundle.train, bundle.val, bundle.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
        pixel = torch.round((x[:, 0, 0, 0] * std + mean) * 255)
        torch.testing.assert_close(pixel, (y * 10).float())
    assert bundle.preprocessing.normalize == "data" and json.dumps(bundle.to_json())


def test_idx_folder_resized_to_the_model(tmp_path):
    bundle = load_data(f"idx:{mnist_folder(tmp_path / 'm')}", input_shape=(1, 3, 16, 16))
    assert bundle.train[0][0].shape == (3, 16, 16) and bundle.input_shape == (1, 3, 16, 16)


def test_idx_split_is_seeded(tmp_path):
    spec = f"idx:{mnist_folder(tmp_path / 'm')}"
    first, again, other = (load_data(spec, seed=s).val.tensors[0] for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_idx_folder_missing_files_are_named(tmp_path):
    root = mnist_folder(tmp_path / "m")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load_data(f"idx:{root}")


def test_idx_labels_that_do_not_match_images(tmp_path):
    root = mnist_folder(tmp_path / "m")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8), gz=True)
    with pytest.raises(DataError, match="belong together"):
        load_data(f"idx:{root}")


# ---------------------------------------------------------------------------------------------------
# `--data fashion-mnist`.


def test_missing_package_gives_the_install_command(tmp_path, monkeypatch, cli):
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataError) as err:
        load_data("fashion-mnist")
    message = str(err.value)
    assert INSTALL in message and "dataset-fashion-mnist" in message and "idx:DIR" in message
    assert "\n" not in message  # one paragraph


@needs_fashion_mnist
def test_fashion_mnist_counts_classes_and_split():
    bundle = load_data("fashion-mnist")
    assert (len(bundle.train) + len(bundle.val), len(bundle.test)) == (60_000, 10_000)
    assert (len(bundle.train), len(bundle.val)) == (55_000, 5_000)
    assert bundle.num_classes == 10 and len(bundle.classes) == 10 and bundle.classes[9] == "Ankle boot"
    assert bundle.input_shape == (1, 1, 28, 28)
    assert np.bincount(bundle.val.tensors[1].numpy()).tolist() == [500] * 10
    again = load_data("fashion-mnist")
    assert torch.equal(bundle.val.tensors[0], again.val.tensors[0])
    assert torch.equal(bundle.train.tensors[1], again.train.tensors[1])


# ---------------------------------------------------------------------------------------------------
# zoo:fashion-cnn.


def test_info_does_not_train_fashion_cnn(cli, monkeypatch):
    from squeeze.model.zoo import trained

    def refuse(*args):
        raise AssertionError("squeeze info trained a zoo model")

    monkeypatch.setattr(trained, "trained_model", refuse)
    r = cli("info", "zoo:fashion-cnn", "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["input_shape"] == [1, 1, 28, 28] and summary["params"] > 50_000


def test_fashion_cnn_entry_says_what_it_trains_on():
    from squeeze.model.zoo import get_entry

    entry = get_entry("fashion-cnn")
    assert entry.trained and "Fashion-MNIST" in entry.description and "dataset-fashion-mnist" in entry.description


@pytest.mark.slow
@needs_fashion_mnist
def test_fashion_cnn_trains_to_its_recorded_accuracy():
    from squeeze.train import evaluate
    from squeeze.model.zoo import create_model

    model = create_model("fashion-cnn")
    assert evaluate(model, load_data("fashion-mnist").test).top1 >= 0.90
