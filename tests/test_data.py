"""Built-in data: digits and Fashion-MNIST IDX splits, loaders, clear errors."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from timm_l2w.data import create_datasets, create_loaders, read_idx


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_fashion(tmp_path, n_train=60, n_test=20, gz=True):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}",
                   rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}",
                   rng.integers(0, 10, (n,), dtype=np.uint8), gz)
    return tmp_path


def test_digits_splits_are_disjoint_fixed_and_model_sized():
    splits = create_datasets("digits", input_size=32)
    assert (len(splits.train), len(splits.held_out), len(splits.test)) == (1197, 300, 300)
    assert splits.num_classes == 10 and splits.input_size == (3, 32, 32)
    again = create_datasets("digits", input_size=16)
    assert torch.equal(splits.test.labels, again.test.labels)  # fixed split, any input size
    train, held, test = create_loaders(splits, batch_size=64, seed=1)
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x[:, 0], x[:, 2])  # grey repeated to 3 channels
    assert abs(float(x.mean())) < 0.3 and 0.7 < float(x.std()) < 1.3  # normalised
    # same seed, same order; another seed, another order
    y1 = next(iter(create_loaders(splits, 64, seed=1)[0]))[1]
    y2 = next(iter(create_loaders(splits, 64, seed=2)[0]))[1]
    assert torch.equal(y, y1) and not torch.equal(y, y2)
    # the three splits together are the whole data set, each image once, every class in each split
    from sklearn.datasets import load_digits
    total = torch.cat([s.images.flatten(1) for s in (splits.train, splits.held_out, splits.test)])
    ref = torch.from_numpy(load_digits().images.reshape(1797, -1).astype(np.float32) / 16.0)
    assert torch.equal(torch.sort(total.sum(1)).values, torch.sort(ref.sum(1)).values)
    assert all(len(torch.unique(s.labels)) == 10 for s in (splits.train, splits.held_out, splits.test))


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    root = _fake_fashion(tmp_path, gz=gz)
    raw = read_idx(root / f"train-images-idx3-ubyte{'.gz' if gz else ''}")
    assert raw.shape == (60, 28, 28) and raw.dtype == np.uint8
    splits = create_datasets("fashion-mnist", data_dir=str(root), input_size=32)
    assert (len(splits.train), len(splits.held_out), len(splits.test)) == (54, 6, 20)
    x, y = next(iter(create_loaders(splits, 8)[2]))
    assert x.shape == (8, 3, 32, 32)
    assert torch.isfinite(x).all()


def test_missing_fashion_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        create_datasets("fashion-mnist", data_dir=str(tmp_path))


def test_truncated_idx_is_a_clear_error(tmp_path):
    root = _fake_fashion(tmp_path, gz=False)
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_unknown_dataset_and_missing_cifar(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist-x'.*digits"):
        create_datasets("mnist-x")
    with pytest.raises(FileNotFoundError, match="--download"):
        create_datasets("torch/cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--data-dir"):
        create_datasets("torch/cifar100")


def test_batch_larger_than_train_set_is_clear():
    splits = create_datasets("digits", input_size=8, held_out=100)
    with pytest.raises(ValueError, match="--batch-size"):
        create_loaders(splits, batch_size=5000)
