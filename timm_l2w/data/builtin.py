"""The built-in data sets (digits, digits-affine, Fashion-MNIST, CIFAR, ImageFolder trees) as
:class:`~timm_l2w.data.splits.DataSplits`; :func:`create_datasets` picks one by name.
"""
from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Subset

from .splits import SPLIT_SEED, BatchTransform, DataSplits, InMemoryImages, check_held_out, split_indices, split_sizes

__all__ = ["BUILTIN_DATASETS", "DIGITS_AFFINE_COPIES", "FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES", "create_datasets",
           "is_image_folder", "random_affine", "read_idx"]

BUILTIN_DATASETS = ("digits", "digits-affine", "fashion-mnist", "torch/cifar10", "torch/cifar100")
FASHION_MNIST_NAMES = ("fashion-mnist", "fashion_mnist", "fmnist")
DIGITS_AFFINE_COPIES = 6  # transformed copies of each training image in ``digits-affine``
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
IMAGEFOLDER_TRAIN = ("train", "training")  # an ImageFolder tree's training folder (as timm names it)
IMAGEFOLDER_EVAL = ("val", "valid", "validation", "eval", "evaluation", "test")  # ... and its test folder
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``([1797, 8, 8] float in 0..16, [1797] int)``.

    Reads the CSV that ships inside the scikit-learn wheel directly (importing sklearn takes seconds);
    falls back to ``sklearn.datasets.load_digits`` if the file is not where it used to be.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn")
    for location in spec.submodule_search_locations or []:
        path = Path(location) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",", dtype=np.float32)
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - other sklearn layouts

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def random_affine(images: Tensor, generator: torch.Generator, rotate: float = math.pi / 6, scale: float = 0.25,
                  shift: float = 0.35) -> Tensor:
    """Each image of ``[N, C, H, W]`` rotated by up to ``rotate`` radians, scaled by up to ``1 +- scale``
    and shifted by up to ``shift`` (in units of half the side), uniformly at random; zero padding."""
    n = images.shape[0]
    u = torch.rand(n, 4, generator=generator) * 2 - 1
    angle, zoom = u[:, 0] * rotate, 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * shift], 1), torch.stack([sin, cos, u[:, 3] * shift], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


def _digits(size: int, in_chans: int, held_out: Optional[int], affine: bool = False) -> DataSplits:
    raw_images, raw_labels = _load_digits()
    images = torch.from_numpy(raw_images / 16.0)[:, None]  # [1797, 1, 8, 8]
    labels = torch.from_numpy(raw_labels)
    n = labels.shape[0]
    n_test = 300
    held_out = 300 if held_out is None else held_out
    check_held_out(held_out, n - n_test, "digits")
    test_idx, held_idx, train_idx = split_indices(n, [n_test, held_out, n - n_test - held_out])
    splits = [(images[i], labels[i]) for i in (train_idx, held_idx, test_idx)]
    if affine:
        gen = torch.Generator().manual_seed(SPLIT_SEED)
        canvas = [F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False) for x, _ in splits]
        copies = (DIGITS_AFFINE_COPIES, 1, 1)
        splits = [(random_affine(x.repeat(c, 1, 1, 1), gen), y.repeat(c))
                  for x, (_, y), c in zip(canvas, splits, copies)]
    mean = float(splits[0][0].mean())
    std = float(splits[0][0].std())
    collate = BatchTransform(size, in_chans, [mean] * in_chans, [std] * in_chans)
    sets = [InMemoryImages(x, y) for x, y in splits]
    return DataSplits(*sets, num_classes=10, input_size=(in_chans, size, size), collate_fn=collate,
                      train_collate_fn=collate, class_names=tuple(str(d) for d in range(10)))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzipped, into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number): re-download the dataset")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header says shape {shape} ({expected} bytes), file has "
            f"{len(data) - header}: re-download the dataset"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}: install Debian's package "
        f"(sudo apt-get install dataset-fashion-mnist, files go to {FASHION_MNIST_DIR}) or download the "
        f"four IDX files from https://github.com/zalandoresearch/fashion-mnist and pass --data-dir DIR"
    )


def _fashion_mnist(data_dir: Optional[str], size: int, in_chans: int, held_out: Optional[int]) -> DataSplits:
    root = Path(data_dir or FASHION_MNIST_DIR)
    arrays = {
        key: read_idx(_find_idx(root, stem))
        for key, stem in (("train_x", "train-images-idx3-ubyte"), ("train_y", "train-labels-idx1-ubyte"),
                          ("test_x", "t10k-images-idx3-ubyte"), ("test_y", "t10k-labels-idx1-ubyte"))
    }
    train_x = torch.from_numpy(arrays["train_x"].astype(np.uint8))[:, None]
    train_y = torch.from_numpy(arrays["train_y"].astype(np.int64))
    test_x = torch.from_numpy(arrays["test_x"].astype(np.uint8))[:, None]
    test_y = torch.from_numpy(arrays["test_y"].astype(np.int64))
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError(f"Fashion-MNIST files in {root} disagree on the number of images: re-download them")
    n = train_y.shape[0]
    held_out = min(5000, max(1, n // 10)) if held_out is None else held_out
    check_held_out(held_out, n, "fashion-mnist")
    held_idx, train_idx = split_indices(n, [held_out, n - held_out])
    mean, std = 0.2860, 0.3530  # Fashion-MNIST training-set statistics
    collate = BatchTransform(size, in_chans, [mean] * in_chans, [std] * in_chans)
    sets = [InMemoryImages(train_x[train_idx], train_y[train_idx]),
            InMemoryImages(train_x[held_idx], train_y[held_idx]), InMemoryImages(test_x, test_y)]
    return DataSplits(*sets, num_classes=10, input_size=(in_chans, size, size), collate_fn=collate,
                      train_collate_fn=collate, class_names=FASHION_MNIST_CLASSES)


def _subfolder(root: Path, names: Sequence[str]) -> Optional[Path]:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _cifar(name: str, data_dir: str, size: int, held_out: Optional[int], download: bool) -> DataSplits:
    """torchvision's CIFAR-10/100 (its python-pickle batch files in ``data_dir``) through timm's create_dataset."""
    from timm.data import create_dataset, create_transform

    def make(split: str):
        try:
            return create_dataset(name, root=data_dir, split=split, download=download, is_training=split == "train")
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{name} not found in {data_dir} ({err}): pass --download to fetch it (needs internet) or "
                f"put the extracted files there (the cifar-10-batches-py / cifar-100-python folder)"
            ) from None

    train_full, held_full, test = make("train"), make("train"), make("test")
    n = len(train_full)
    held = split_sizes(n, held_out, name)
    held_idx, train_idx = split_indices(n, [held, n - held])
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    train_full.transform = create_transform(size, is_training=True, mean=mean, std=std, scale=(0.6, 1.0),
                                            hflip=0.5, color_jitter=None)
    held_full.transform = test.transform = create_transform(size, is_training=False, mean=mean, std=std, crop_pct=1.0)
    num_classes = 10 if name == "torch/cifar10" else 100
    names = getattr(train_full, "classes", None)
    return DataSplits(Subset(train_full, train_idx.tolist()), Subset(held_full, held_idx.tolist()), test,
                      num_classes=num_classes, input_size=(3, size, size),
                      class_names=tuple(map(str, names)) if names and len(names) == num_classes else None)


def _image_folder(data_dir: str, size: int, in_chans: int, held_out: Optional[int],
                  eval_config: Optional[Mapping[str, Any]] = None) -> DataSplits:
    """An ImageFolder tree read by timm's ImageDataset: ``DIR/train/<class>/`` + ``DIR/val/<class>/`` (test
    = val), or class folders only (``DIR/<class>/``, or ``DIR/train/`` without a val/): then a fixed seeded
    fifth of the images is the test split, so the test images are never trained on. The held-out and test
    images go through ``create_transform(**eval_config, is_training=False)`` (default: the training recipe's,
    ``size`` px, centre crop 0.875, bilinear, ImageNet mean / std)."""
    from timm.data import ImageDataset, create_transform, resolve_data_config

    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {data_dir} does not exist: pass a folder with train/ and val/ "
                                f"(or with one folder of images per class)")
    train_root = _subfolder(root, IMAGEFOLDER_TRAIN) or root
    eval_root = _subfolder(root, IMAGEFOLDER_EVAL)
    try:
        train_full, held_full = ImageDataset(str(train_root)), ImageDataset(str(train_root))
    except Exception as err:  # noqa: BLE001 - timm's reader: no class folders, no images, ...
        raise FileNotFoundError(f"no ImageFolder images in {train_root} ({err}): it needs one folder of images "
                                f"per class") from None
    class_to_idx = dict(train_full.reader.class_to_idx)
    names = tuple(sorted(class_to_idx, key=class_to_idx.get))
    n = len(train_full)
    if eval_root is not None:
        _check_eval_classes(eval_root, class_to_idx, train_root)
        test = ImageDataset(str(eval_root), class_map=class_to_idx)
        held = split_sizes(n, held_out, "ImageFolder")
        held_idx, train_idx = split_indices(n, [held, n - held])
        test_idx, note = None, f"test = {eval_root.name}/"
    else:
        test = ImageDataset(str(train_root))
        n_test = max(1, n // 5)
        held = split_sizes(n - n_test, held_out, "ImageFolder")
        test_idx, held_idx, train_idx = split_indices(n, [n_test, held, n - n_test - held])
        note = (f"no val/ folder: a fixed seeded fifth of {train_root.name}/ is the test split, the rest gives "
                f"the training and held-out images")
    cfg = resolve_data_config({"input_size": (in_chans, size, size), "interpolation": "bilinear"})
    train_full.transform = create_transform(size, is_training=True, mean=cfg["mean"], std=cfg["std"])
    cfg = dict(eval_config or cfg)
    held_full.transform = test.transform = create_transform(**cfg, is_training=False)
    test_set = test if test_idx is None else Subset(test, test_idx.tolist())
    return DataSplits(Subset(train_full, train_idx.tolist()), Subset(held_full, held_idx.tolist()), test_set,
                      num_classes=len(names), input_size=(3, *cfg["input_size"][-2:]), class_names=names, note=note,
                      eval_config=cfg)


def _check_eval_classes(eval_root: Path, class_to_idx: dict, train_root: Path) -> None:
    """Every class folder of ``eval_root`` must be one of the training classes (their indices are the training ones)."""
    found = sorted(p.name for p in eval_root.iterdir() if p.is_dir())
    unknown = [c for c in found if c not in class_to_idx]
    if not found or unknown:
        raise ValueError(f"{eval_root} must hold class folders named as in {train_root} "
                         + (f"(unknown: {', '.join(unknown[:8])})" if unknown else "(it has none)")
                         + ": rename them, or remove it to draw the test split from the training images")


def is_image_folder(name: str, data_dir: Optional[str]) -> bool:
    """True when :func:`create_datasets` reads ``name`` as an ImageFolder tree in ``data_dir`` (not a built-in set)."""
    key = name.lower()
    return data_dir is not None and "/" not in key and key not in BUILTIN_DATASETS + FASHION_MNIST_NAMES


def create_datasets(name: str, data_dir: Optional[str] = None, input_size: int = 32, in_chans: int = 3,
                    held_out: Optional[int] = None, download: bool = False,
                    eval_config: Optional[Mapping[str, Any]] = None) -> DataSplits:
    """Train / held-out / test datasets of ``name`` (see the module docstring for the choices).

    ``input_size`` is the square image side the model expects; ``held_out`` the number of training
    images set aside for threshold calibration (default: 300 for digits, 5,000 otherwise).
    An unknown ``name`` without ``data_dir`` is an error; with ``data_dir`` it is read as an
    ImageFolder tree (``DIR/train/<class>/*.jpg`` + ``DIR/val/...``, or ``DIR/<class>/*.jpg`` split by seed) by timm.
    ``eval_config`` (timm's data config, as ``timm.data.resolve_data_config`` gives it) sets an ImageFolder's
    held-out and test preprocessing (it is recorded as ``DataSplits.eval_config``); the built-in sets keep theirs.
    """
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive int (image side in pixels), got {input_size!r}")
    key = name.lower()
    if key in ("digits", "digits-affine"):
        return _digits(input_size, in_chans, held_out, affine=key == "digits-affine")
    if key in FASHION_MNIST_NAMES:
        return _fashion_mnist(data_dir, input_size, in_chans, held_out)
    if key in ("torch/cifar10", "torch/cifar100"):
        if data_dir is None:
            raise ValueError(f"dataset '{name}' needs --data-dir DIR (the folder holding its files)")
        return _cifar(key, data_dir, input_size, held_out, download)
    if is_image_folder(name, data_dir):
        return _image_folder(data_dir, input_size, in_chans, held_out, eval_config)
    raise ValueError(
        f"unknown dataset '{name}': choose one of {', '.join(BUILTIN_DATASETS)}, or pass --data-dir DIR "
        f"with an ImageFolder tree (and any name, e.g. 'folder')"
    )
