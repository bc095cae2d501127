"""Built-in data: digits and Fashion-MNIST IDX splits, loaders, clear errors."""
from __future__ import annotations

import gzip
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import register_tiny, write_image_folder
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


# ----------------------------------------------------------------------------- the paper's data routes (issue 23)




TINY = register_tiny()
RUN = ["--model", TINY, "--batch-size", "8", "--max-steps", "2", "--lr", "0.05", "--log-with", "none", "--no-progress"]


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    """torchvision's CIFAR-100 on-disk format (``cifar-100-python/{train,test,meta}``, python pickles)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        fine = (np.arange(n) % 100).tolist()
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine,
                 "coarse_labels": [f // 5 for f in fine], "filenames": [f"{split}_{i}.png" for i in range(n)],
                 "batch_label": f"{split} batch"}
        (folder / split).write_bytes(pickle.dumps(batch))
    meta = {"fine_label_names": [f"class_{k:02d}" for k in range(100)],
            "coarse_label_names": [f"super_{k:02d}" for k in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def cifar100_dir(tmp_path, monkeypatch):
    """A CIFAR-100 tree; torchvision's integrity check stays on, with the checksums of these files."""
    from torchvision.datasets import CIFAR100

    root = write_cifar100(tmp_path / "cifar")
    folder = root / "cifar-100-python"
    monkeypatch.setattr(CIFAR100, "train_list", [["train", _md5(folder / "train")]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", _md5(folder / "test")]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": _md5(folder / "meta")})
    return root


def _paths(subset) -> list:
    """The image files of a Subset of timm's ImageDataset."""
    samples = subset.dataset.reader.samples
    return [samples[i][0] for i in subset.indices]


def test_flat_image_folder_is_split_by_a_fixed_seed_never_testing_on_training_images(tmp_path):
    root = write_image_folder(tmp_path / "flat", per_class=20)  # 60 images, class folders only
    splits = create_datasets("folder", data_dir=str(root), input_size=8)
    train, held, test = map(set, (_paths(splits.train), _paths(splits.held_out), _paths(splits.test)))
    assert (len(train), len(held), len(test)) == (44, 4, 12)  # a fifth is the test split, a tenth of the rest held out
    assert not (train & test) and not (train & held) and not (held & test)
    assert splits.class_names == ("cat", "dog", "owl") and splits.num_classes == 3
    again = create_datasets("folder", data_dir=str(root), input_size=8)
    assert _paths(again.test) == _paths(splits.test)  # reproducible
    x, y = splits.test[0]
    assert x.shape == (3, 8, 8) and 0 <= int(y) < 3


def test_imagenet_style_train_and_val_folders(tmp_path):
    root = tmp_path / "tree"
    write_image_folder(root / "train", per_class=10)
    write_image_folder(root / "val", per_class=3, seed=1)
    splits = create_datasets("tree", data_dir=str(root), input_size=8, held_out=6)
    assert (len(splits.train), len(splits.held_out), len(splits.test)) == (24, 6, 9)
    assert all("/val/" in p for p in splits.test.reader.filenames(absolute=True))
    assert splits.note.startswith("test = val")
    assert sorted(int(splits.test[i][1]) for i in range(9)) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    (root / "val" / "emu").mkdir()  # a class the training folder does not have
    with pytest.raises(ValueError, match="unknown: emu"):
        create_datasets("tree", data_dir=str(root), input_size=8)


def test_image_folder_routes_through_train_and_eval(tmp_path, capsys):
    from timm_l2w.cli.eval import main as eval_main
    from timm_l2w.cli.train import main as train_main

    root = tmp_path / "tree"
    write_image_folder(root / "train", per_class=10)
    write_image_folder(root / "val", per_class=3, seed=1)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="too few to calibrate the 39 budgets"):  # 3 held-out images
        assert train_main(RUN + ["--dataset", "tree", "--data-dir", str(root), "--input-size", "8",
                                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "27 / 3 / 9 images (train / held-out / test), 3 classes: cat, dog, owl; test = val/" in printed
    result = json.loads((out / f"{TINY}_l2w.json").read_text())
    assert result["num_test"] == 9
    assert eval_main([str(out / "model.safetensors"), "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    printed = capsys.readouterr().out  # no --dataset: the tree the checkpoint records, at its input size
    assert f"data set tree in {root}, 8x8 images (recorded in" in printed and printed.count("MFLOPs") >= 3
    assert json.loads((tmp_path / "ev" / f"{TINY}.json").read_text())["num_test"] == 9


def test_cifar100_python_batches_route_through_train_and_eval(cifar100_dir, tmp_path, capsys):
    from timm_l2w.cli.eval import main as eval_main
    from timm_l2w.cli.train import main as train_main

    splits = create_datasets("torch/cifar100", data_dir=str(cifar100_dir), input_size=32, held_out=40)
    assert (len(splits.train), len(splits.held_out), len(splits.test)) == (160, 40, 100)
    assert splits.num_classes == 100 and splits.class_names[:2] == ("class_00", "class_01")
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    out = tmp_path / "run"
    assert train_main(RUN + ["--dataset", "torch/cifar100", "--data-dir", str(cifar100_dir), "--held-out", "40",
                             "--weighting", "uniform", "--output", str(out)]) == 0
    assert "160 / 40 / 100 images (train / held-out / test), 100 classes: class_00" in capsys.readouterr().out
    assert eval_main([str(out / "model.safetensors"), "--output", str(tmp_path / "ev"), "--no-progress"]) == 0
    assert "data set torch/cifar100 in" in capsys.readouterr().out
    assert json.loads((tmp_path / "ev" / f"{TINY}.json").read_text())["num_heldout"] == 40


def test_cifar_without_its_files_says_where_they_go(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        create_datasets("torch/cifar100", data_dir=str(tmp_path))
