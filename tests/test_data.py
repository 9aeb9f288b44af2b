import numpy as np
import pytest
import torch

from squeeze.data import digits_splits

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
