from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

from squeeze.data import IMAGENET_MEAN, digits_splits, load_data, read_image
from squeeze.preprocessing import Preprocessing, from_flags, parse_normalize
from squeeze.errors import DataError

N_DIGITS = 1797


@pytest.fixture(scope="module")
def splits():
    return digits_splits()


def _labels(dataset) -> np.ndarray:
    return dataset.tensors[1].numpy()


def test_split_sizes_are_60_20_20(splits):
    sizes = [len(splits.train), len(splits.val), len(splits.test)]
    assert sum(sizes) == N_DIGITS
    assert sizes == [1077, 360, 360]


def test_splits_are_stratified(splits):
    overall = np.bincount(np.concatenate([_labels(s) for s in (splits.train, splits.val, splits.test)]))
    for part in (splits.train, splits.val, splits.test):
        share = np.bincount(_labels(part), minlength=10) / len(part)
        np.testing.assert_allclose(share, overall / N_DIGITS, atol=0.01)


def test_splits_are_disjoint(splits):
    # The 1797 digit images are all distinct, so comparing rows as bytes finds any leak.
    def rows(dataset) -> set[bytes]:
        return {row.numpy().tobytes() for row in dataset.tensors[0]}

    train, val, test = rows(splits.train), rows(splits.val), rows(splits.test)
    assert not train & val and not train & test and not val & test
    assert len(train | val | test) == N_DIGITS


def test_shapes_and_dtypes(splits):
    assert splits.input_shape == (1, 1, 16, 16)
    assert splits.num_classes == 10
    x, y = splits.train.tensors
    assert x.shape == (1077, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (1077,) and y.dtype == torch.int64
    assert set(y.tolist()) == set(range(10))


def test_train_split_is_normalized(splits):
    x = splits.train.tensors[0]
    assert abs(float(x.mean())) < 1e-4
    assert float(x.std()) == pytest.approx(1.0, abs=1e-3)
    # The stored constants are the raw [0, 1] pixel statistics that produced it.
    assert 0.0 < splits.mean < 1.0 and splits.std > 0.0


def test_deterministic_across_calls():
    digits_splits.cache_clear()
    first = digits_splits()
    digits_splits.cache_clear()
    second = digits_splits()
    assert first is not second
    for a, b in zip((first.train, first.val, first.test), (second.train, second.val, second.test)):
        assert torch.equal(a.tensors[0], b.tensors[0])
        assert torch.equal(a.tensors[1], b.tensors[1])
    assert (first.mean, first.std) == (second.mean, second.std)


def test_image_size_and_seed_are_honoured():
    small = digits_splits(image_size=8)
    assert small.train.tensors[0].shape[1:] == (1, 8, 8)
    assert small.input_shape == (1, 1, 8, 8)
    other = digits_splits(seed=1)
    assert not torch.equal(other.test.tensors[1], digits_splits().test.tensors[1])


# ---------------------------------------------------------------------------------------------------
# load_data: the digits spec.


def test_load_data_digits_is_digits_splits(splits):
    bundle = load_data("digits")
    assert bundle.held_out() == ("test", bundle.test)
    assert bundle.input_shape == (1, 1, 16, 16) and bundle.num_classes == 10
    assert bundle.classes == tuple("0123456789")
    for ours, theirs in ((bundle.train, splits.train), (bundle.val, splits.val), (bundle.test, splits.test)):
        assert torch.equal(ours.tensors[0], theirs.tensors[0])
        assert torch.equal(ours.tensors[1], theirs.tensors[1])
    assert bundle.mean == (splits.mean,) and bundle.std == (splits.std,)
    assert bundle.to_json()["train_size"] == 1077


def test_digits_follow_the_model_input_shape():
    bundle = load_data("digits", input_shape=(1, 3, 20, 24))
    x = bundle.train.tensors[0]
    assert x.shape == (1077, 3, 20, 24) and bundle.input_shape == (1, 3, 20, 24)
    # Grey digits repeated into three identical channels, each normalized with the same statistics.
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert len(bundle.mean) == 3 and len(set(bundle.mean)) == 1
    assert abs(float(x.mean())) < 1e-4


def test_digits_normalization_choices():
    raw = load_data("digits", preprocessing=parse_normalize("none"))
    assert raw.mean == (0.0,) and raw.std == (1.0,)
    assert float(raw.train.tensors[0].min()) >= 0.0 and float(raw.train.tensors[0].max()) <= 1.0

    imagenet = load_data("digits", preprocessing=parse_normalize("imagenet"))
    # One grey channel gets the luma-weighted ImageNet statistics.
    grey_mean = 0.299 * IMAGENET_MEAN[0] + 0.587 * IMAGENET_MEAN[1] + 0.114 * IMAGENET_MEAN[2]
    assert imagenet.mean == pytest.approx((grey_mean,))
    expected = (raw.val.tensors[0] - imagenet.mean[0]) / imagenet.std[0]
    torch.testing.assert_close(imagenet.val.tensors[0], expected)
    assert load_data("digits", input_shape=(1, 3, 16, 16), preprocessing=parse_normalize("imagenet")).mean == IMAGENET_MEAN

    explicit = load_data("digits", preprocessing=parse_normalize("0.5,0.25"))
    torch.testing.assert_close(explicit.test.tensors[0], (raw.test.tensors[0] - 0.5) / 0.25)


@pytest.mark.parametrize(
    "text, words",
    [("fancy", ["`fancy`", "data", "imagenet", "none", "MEAN,STD", "M1,M2,M3:S1,S2,S3"]),
     ("0.5,0", ["std must be positive"]), ("0.5", ["Accepted forms"]), ("0.5,0.5,0.5", ["Accepted forms"]),
     ("a:b", ["Accepted forms"]), ("0.1,0.2:0.3,0.4,0.5", ["2 means but 3 stds"])],
)
def test_bad_normalize_text_is_named(text, words):
    with pytest.raises(DataError) as info:
        parse_normalize(text)
    for word in words:
        assert word in str(info.value)


def test_normalize_values_must_fit_the_channels():
    with pytest.raises(DataError, match="2 means/stds, but the model takes 3 input channels"):
        load_data("digits", input_shape=(1, 3, 16, 16), preprocessing=parse_normalize("0.1,0.2:0.3,0.4"))


def test_digits_refuse_other_channel_counts():
    with pytest.raises(DataError, match=r"\(4, 16, 16\)"):
        load_data("digits", input_shape=(1, 4, 16, 16))


# ---------------------------------------------------------------------------------------------------
# Image files, written with Pillow.


def write_image(path: Path, samples: np.ndarray) -> Path:
    """samples: (H, W, 1) grey or (H, W, 3) RGB integers in [0, 255]; the suffix picks the format."""
    array = samples.astype(np.uint8)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)
    return path


@pytest.mark.parametrize("channels", [1, 3])
def test_read_image_png_exact(tmp_path, channels):
    samples = np.random.default_rng(channels).integers(0, 256, size=(11, 7, channels))
    got = read_image(write_image(tmp_path / "x.png", samples))
    assert got.dtype == torch.float32 and tuple(got.shape) == (channels, 11, 7)
    np.testing.assert_allclose(got.numpy().transpose(1, 2, 0), samples / 255.0, atol=1e-6)


def test_read_image_jpeg_and_alpha(tmp_path):
    smooth = np.tile(np.arange(16)[None, :, None] * 10, (16, 1, 3))
    got = read_image(write_image(tmp_path / "x.jpg", smooth))
    assert tuple(got.shape) == (3, 16, 16) and np.abs(got.numpy().transpose(1, 2, 0) - smooth / 255.0).max() < 0.05
    Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(tmp_path / "a.png")
    assert tuple(read_image(tmp_path / "a.png").shape) == (3, 4, 4)  # alpha dropped


def test_unreadable_image_is_a_data_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"GIF89a not an image")
    with pytest.raises(DataError, match="not a readable image"):
        read_image(tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------------
# Folders of class sub-folders.

CLASSES = ["apple", "banana", "cherry"]


def _image(label: int, index: int, size: tuple[int, int], rgb: bool) -> np.ndarray:
    """A distinct 8-bit image per (class, index): brightness by class, a gradient by index."""
    height, width = size
    grey = 40 + 70 * label + 3 * index + np.arange(width)[None, :] + np.arange(height)[:, None]
    if not rgb:
        return grey[:, :, None]
    return np.stack([grey, 255 - grey, np.full_like(grey, 10 * index)], axis=2)


def make_folder(root: Path, counts: dict[str, int], *, rgb: bool = False, size=(10, 12)) -> Path:
    for label, name in enumerate(CLASSES):
        if name not in counts:
            continue
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(counts[name]):
            write_image(root / name / f"{i:03d}.png", _image(label, i, size, rgb))
    return root


def _labels_of(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


def test_split_folder_layout_grey(tmp_path):
    make_folder(tmp_path / "train", {name: 4 for name in CLASSES})
    make_folder(tmp_path / "val", {name: 2 for name in CLASSES})
    bundle = load_data(str(tmp_path), input_shape=(1, 1, 8, 8))
    assert bundle.classes == tuple(CLASSES) and bundle.num_classes == 3
    assert (len(bundle.train), len(bundle.val), bundle.test) == (12, 6, None)
    assert bundle.input_shape == (1, 1, 8, 8)
    x, y = bundle.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y == 0
    assert _labels_of(bundle.train) == [0] * 4 + [1] * 4 + [2] * 4
    assert _labels_of(bundle.val) == [0, 0, 1, 1, 2, 2]
    # Default normalization: the train split's own statistics (all 12 images are in the sample).
    train = torch.stack([bundle.train[i][0] for i in range(12)])
    assert abs(float(train.mean())) < 1e-5
    assert float(train.std()) == pytest.approx(1.0, abs=1e-4)
    # Brighter classes stay brighter after resizing and normalizing.
    assert float(bundle.val[0][0].mean()) < float(bundle.val[2][0].mean()) < float(bundle.val[4][0].mean())


def test_split_folder_layout_with_test_split(tmp_path):
    make_folder(tmp_path / "train", {name: 3 for name in CLASSES})
    make_folder(tmp_path / "val", {"apple": 1, "cherry": 1})  # val may lack a class
    make_folder(tmp_path / "test", {"banana": 2})
    bundle = load_data(str(tmp_path), input_shape=(1, 1, 10, 12), preprocessing=parse_normalize("none"))
    assert _labels_of(bundle.val) == [0, 2] and _labels_of(bundle.test) == [1, 1]
    # normalization "none": raw pixels, and no resize at the images' own size.
    expected = torch.from_numpy(_image(1, 0, (10, 12), rgb=False)[:, :, 0] / 255.0).float()
    torch.testing.assert_close(bundle.test[0][0][0], expected)


def test_single_folder_is_split_deterministically_per_class(tmp_path):
    make_folder(tmp_path, {"apple": 5, "banana": 10}, rgb=True, size=(9, 9))
    bundle = load_data(str(tmp_path), input_shape=(1, 3, 6, 6))
    assert bundle.classes == ("apple", "banana")
    assert (len(bundle.train), len(bundle.val)) == (12, 3)  # 20 % per class: 1 + 2
    assert sorted(_labels_of(bundle.val)) == [0, 1, 1]
    assert bundle.train[0][0].shape == (3, 6, 6) and len(bundle.mean) == 3

    def files(dataset) -> list[Path]:
        return [path for path, _ in dataset.samples]

    train, val = files(bundle.train), files(bundle.val)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(tmp_path.rglob("*.png"))
    again = load_data(str(tmp_path), input_shape=(1, 3, 6, 6))
    assert files(again.train) == train and files(again.val) == val
    others = [files(load_data(str(tmp_path), input_shape=(1, 3, 6, 6), seed=s).val) for s in range(1, 6)]
    assert any(other != val for other in others)


def test_folder_images_follow_the_model_channels(tmp_path):
    make_folder(tmp_path / "rgb", {"apple": 2, "banana": 2}, rgb=True, size=(5, 5))
    grey_model = load_data(str(tmp_path / "rgb"), input_shape=(1, 1, 5, 5), preprocessing=parse_normalize("none"))
    x, _ = grey_model.train[0]
    # A grey model sees the BT.601 luma of the RGB pixels.
    rgb = read_image(grey_model.train.samples[0][0])
    assert rgb.shape == (3, 5, 5)
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    torch.testing.assert_close(x[0], luma)

    make_folder(tmp_path / "grey", {"apple": 2, "banana": 2}, size=(5, 5))
    rgb_model = load_data(str(tmp_path / "grey"), input_shape=(1, 3, 5, 5), preprocessing=parse_normalize("imagenet"))
    x, _ = rgb_model.val[0]
    assert x.shape == (3, 5, 5) and rgb_model.mean == IMAGENET_MEAN
    raw = x * torch.tensor(rgb_model.std).view(3, 1, 1) + torch.tensor(rgb_model.mean).view(3, 1, 1)
    torch.testing.assert_close(raw[0], raw[1])
    torch.testing.assert_close(raw[0], raw[2])


def test_folder_shape_defaults_to_the_first_image(tmp_path):
    make_folder(tmp_path, {"apple": 2, "banana": 2}, rgb=True, size=(7, 9))
    assert load_data(str(tmp_path)).input_shape == (1, 3, 7, 9)


def _data_error(spec: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load_data(spec, **kwargs)
    return str(info.value)


def test_folder_errors_say_what_is_wrong(tmp_path):
    assert "No folder at" in _data_error(str(tmp_path / "missing"))
    message = _data_error("./nope/imgs")
    assert "No folder at `./nope/imgs`" in message and "package.module:function" in message

    make_folder(tmp_path / "a", {"apple": 3})
    (tmp_path / "a" / "banana").mkdir()
    (tmp_path / "a" / "cherry").mkdir()
    (tmp_path / "a" / "cherry" / "notes.txt").write_text("not an image")
    message = _data_error(str(tmp_path / "a"))
    assert "2 class folder(s)" in message and "banana, cherry" in message and "hold no images" in message

    (tmp_path / "b").mkdir()
    assert "no class sub-folders" in _data_error(str(tmp_path / "b"))

    make_folder(tmp_path / "c" / "train", {"apple": 2})
    assert "no `val/` folder" in _data_error(str(tmp_path / "c"))

    make_folder(tmp_path / "d" / "train", {"apple": 2})
    make_folder(tmp_path / "d" / "val", {"apple": 1, "banana": 1})
    assert "classes that" in _data_error(str(tmp_path / "d")) and "banana" in _data_error(str(tmp_path / "d"))

    make_folder(tmp_path / "e", {"apple": 1, "banana": 3})
    assert "at least 2 per class" in _data_error(str(tmp_path / "e"))

    make_folder(tmp_path / "f", {"apple": 2, "banana": 2})
    assert "4 channels" in _data_error(str(tmp_path / "f"), input_shape=(1, 4, 8, 8))

    file_spec = tmp_path / "f" / "apple" / "000.png"
    assert "is a file" in _data_error(str(file_spec))


def test_jpeg_folder_loads(tmp_path):
    make_folder(tmp_path, {"apple": 2, "banana": 2})
    write_image(tmp_path / "apple" / "photo.jpg", _image(0, 9, (10, 12), False))
    bundle = load_data(str(tmp_path))
    assert len(bundle.train) + len(bundle.val) == 5


def test_unknown_spec_lists_the_accepted_forms():
    message = _data_error("imagenet")
    assert "Unknown --data `imagenet`" in message
    for form in ("`digits`", "`fashion-mnist`", "`idx:DIR`", "root/train/<class>", "root/<class>",
                 "package.module:function"):
        assert form in message


# ---------------------------------------------------------------------------------------------------
# package.module:function

DATA_MODULE = '''
import torch
from torch.utils.data import TensorDataset

def _split(n, shape, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand((n, *shape), generator=g), torch.arange(n) % 4)

def pair():
    return _split(20, (1, 8, 8), 0), _split(8, (1, 8, 8), 1)

def mapping():
    return {"train": _split(20, (3, 6, 6), 0), "val": _split(8, (3, 6, 6), 1),
            "test": _split(4, (3, 6, 6), 2), "num_classes": 7}

def mismatched():
    return _split(20, (1, 8, 8), 0), _split(8, (1, 9, 9), 1)

def not_datasets():
    return 42

def broken():
    raise RuntimeError("disk on fire")
'''


@pytest.fixture
def data_module(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "data_module"
    folder.mkdir(exist_ok=True)
    (folder / "squeeze_test_data_fns.py").write_text(DATA_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    return "squeeze_test_data_fns"


def test_module_function_pair(data_module):
    bundle = load_data(f"{data_module}:pair", input_shape=(1, 1, 8, 8))
    assert (len(bundle.train), len(bundle.val), bundle.test) == (20, 8, None)
    assert bundle.num_classes == 4  # from the labels 0..3
    assert bundle.input_shape == (1, 1, 8, 8)
    # Used as returned, and recorded so: no normalization, no resize.
    assert bundle.preprocessing == Preprocessing(normalize="none", mean=(0.0,), std=(1.0,), resize="none")
    assert load_data(f"{data_module}:pair").input_shape == (1, 1, 8, 8)  # shape taken from the samples
    name, split = bundle.held_out()  # no test split: accuracy is reported on val
    assert name == "val" and split is bundle.val


def test_module_function_dict_and_normalization(data_module):
    bundle = load_data(f"{data_module}:mapping", preprocessing=parse_normalize("0.5,0.5"))
    assert bundle.num_classes == 7 and len(bundle.test) == 4
    assert bundle.mean == (0.5, 0.5, 0.5)
    raw = load_data(f"{data_module}:mapping")
    torch.testing.assert_close(bundle.val[3][0], (raw.val[3][0] - 0.5) / 0.5)


def test_module_function_errors(data_module):
    message = _data_error(f"{data_module}:pair", input_shape=(1, 3, 32, 32))
    assert "(1, 8, 8)" in message and "(3, 32, 32)" in message
    assert "different shapes" in _data_error(f"{data_module}:mismatched")
    assert "returned a int" in _data_error(f"{data_module}:not_datasets")
    assert "disk on fire" in _data_error(f"{data_module}:broken")
    assert "Cannot import" in _data_error(f"{data_module}:missing")
    assert "Cannot import" in _data_error("no_such_package_xyz.data:fn")


def test_folder_resize_none_keeps_the_size_or_names_the_image(tmp_path):
    make_folder(tmp_path, {"apple": 2, "banana": 2}, size=(6, 6))
    keep = from_flags("none", "none")
    assert load_data(str(tmp_path), input_shape=(1, 1, 6, 6), preprocessing=keep).train[0][0].shape == (1, 6, 6)
    bigger = load_data(str(tmp_path), input_shape=(1, 1, 8, 8), preprocessing=keep)
    with pytest.raises(DataError, match=r"\.png: the images are 6x6, the model takes 8x8, and --resize none"):
        bigger.train[0]
